"""The updater's checkpoint schema: explicit fields, validated on load.

Fields: format, step, total_steps, config (dict), masks {layer: bool tensor}, plans {layer: dict}, generator
(torch.Generator state), grad_buffers {layer: float32 tensor} (only mid-window), explored {layer: packed bits}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import Method, SRigLConfig
from ..errors import CheckpointError, InvariantError
from ..sparsity import check_constant_fan_in

if TYPE_CHECKING:
    from .updater import SRigLUpdater

__all__ = ["FORMAT", "updater_state", "load_updater_state"]

FORMAT = "srigl_compile.updater/1"
# Fields that change what the updater does: a resumed run must agree on them to continue the same run.
_TRAINING_FIELDS = ("method", "ablation", "gamma_sal", "alpha", "delta_t", "t_end_fraction", "grad_accumulation_n",
                    "seed")
_FIELDS = ("format", "step", "total_steps", "config", "masks", "plans", "generator", "grad_buffers", "explored")
# Plan fields a resumed run must share: they fix each layer's budget and fan-in (the sparsity it trains at).
_PLAN_FIELDS = ("n_out", "fan_in", "budget", "k0", "protected")


def updater_state(updater: SRigLUpdater) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": updater.step_count,
        "total_steps": updater.total_steps,
        "config": updater.config.to_dict(),
        "masks": {name: layer.mask.clone() for name, layer in updater.layers.items()},
        "plans": {name: layer.srigl_plan.to_dict() for name, layer in updater.layers.items()},
        "generator": updater.generator.get_state(),
        "grad_buffers": {name: buf.clone() for name, buf in updater._tap.buffers.items()},
        "explored": {name: bits.clone() for name, bits in updater.explored.items()},
    }


def _check_compatible(updater: SRigLUpdater, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "masks" not in state:
        raise CheckpointError(
            "the checkpoint has no masks: it is not an SRigLUpdater.state_dict() (save one with "
            "updater.state_dict() next to the model and optimizer state)"
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(f"unknown updater checkpoint format {state.get('format')!r}; expected {FORMAT!r}")
    missing = [field for field in _FIELDS if field not in state]
    if missing:  # checked before anything is restored: a failed load leaves the model as it was
        raise CheckpointError(f"the updater checkpoint lacks {missing}: it is truncated or was edited; save it "
                              "again with updater.state_dict()")
    saved, ours = set(state["masks"]), set(updater.layers)
    if saved != ours:
        raise CheckpointError(
            f"the checkpoint belongs to another model: layers only in the checkpoint {sorted(saved - ours)[:5]}, "
            f"only in this model {sorted(ours - saved)[:5]}"
        )
    for name, mask in state["masks"].items():
        if tuple(mask.shape) != tuple(updater.layers[name].mask.shape):
            raise CheckpointError(f"layer {name!r}: checkpoint mask {tuple(mask.shape)} does not match the model's "
                                  f"{tuple(updater.layers[name].mask.shape)}")
    for name, layer in updater.layers.items():
        saved_plan, plan = state["plans"].get(name, {}), layer.srigl_plan.to_dict()
        differing = [f for f in _PLAN_FIELDS if saved_plan.get(f) != plan.get(f)]
        if differing:
            raise CheckpointError(
                f"layer {name!r}: the checkpoint's plan differs in {differing} "
                f"({[saved_plan.get(f) for f in differing]} against {[plan.get(f) for f in differing]}): it was made "
                "at another sparsity or distribution. Sparsify the model with the saved config "
                "(SRigLConfig.from_dict(state['config'])) to resume")
        mask = state["masks"][name]
        if int(mask.sum()) > plan["budget"]:
            raise CheckpointError(f"layer {name!r}: the checkpoint's mask holds {int(mask.sum())} non-zeros, over "
                                  f"the layer's budget of {plan['budget']}: it is corrupt")
        if updater.config.method in (Method.SRIGL, Method.STATIC):
            try:
                check_constant_fan_in(layer.neuron_view(mask), layer=name)
            except InvariantError as err:
                raise CheckpointError(f"the checkpoint's mask is not constant fan-in: {err}") from None
    saved_config = SRigLConfig.from_dict(state["config"])
    differing = [f for f in _TRAINING_FIELDS if getattr(saved_config, f) != getattr(updater.config, f)]
    if differing or state["total_steps"] != updater.total_steps:
        raise CheckpointError(
            f"the checkpoint was made with other training settings ({differing or 'total_steps'}); build the "
            "updater with the saved config (SRigLConfig.from_dict(state['config'])) and total_steps to resume"
        )


@torch.no_grad()
def load_updater_state(updater: SRigLUpdater, state: dict[str, Any]) -> None:
    _check_compatible(updater, state)
    for name, layer in updater.layers.items():
        layer.mask.copy_(state["masks"][name])
        layer.apply_mask_()
    updater.step_count = int(state["step"])
    updater.generator.set_state(state["generator"])
    updater._tap.buffers = {name: buf.clone() for name, buf in state["grad_buffers"].items()}
    updater.explored = {name: bits.clone() for name, bits in state["explored"].items()}
