"""The updater's checkpoint schema: explicit fields, all validated before anything is restored.

Fields: format, step, total_steps, config (dict), masks {layer: bool tensor}, plans {layer: dict}, generator
(torch.Generator state), grad_buffers {layer: float32 tensor} (only mid-window), explored {layer: packed bits};
window_skips (steps of the open window the optimizer skipped); start {layer: [non-zeros, ablated, k]} (the masks
the run started from, ``run_start``); distributed runs add rank_grad_buffers [one grad_buffers per rank] (each
rank's own, not yet averaged, window). window_skips and start are absent in older checkpoints.

``load_updater_state`` checks every field against what the updater maintains (the mask invariants of each method,
step an int >= 0 (step() may go past total_steps, the masks frozen then), a generator state torch accepts, buffer
and bit-array shapes, no meta tensors) and raises a ``CheckpointError`` naming the field and layer before it
changes anything: a failed load leaves the updater and its model as they were.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..config import SRigLConfig
from ..errors import CheckpointError, InvariantError, SRigLError
from ..nn.sharding import part_like, whole_like
from ..sparsity import check_constant_fan_in
from .exploration import unpack_bits
from .methods import MethodRule
from .rank_sync import RankSync
from .run_start import LayerStart, parse_start, sparsify_start

__all__ = ["FORMAT", "updater_state", "load_updater_state"]

FORMAT = "srigl_compile.updater/1"
# Fields that change what the updater does: a resumed run must agree on them to continue the same run.
_TRAINING_FIELDS = ("method", "ablation", "gamma_sal", "alpha", "delta_t", "t_end_fraction", "grad_accumulation_n",
                    "seed")
_FIELDS = ("format", "step", "total_steps", "config", "masks", "plans", "generator", "grad_buffers", "explored")
_LAYER_FIELDS = ("masks", "plans", "grad_buffers", "explored")  # {layer name: ...}
# Plan fields a resumed run must share: they fix each layer's budget and fan-in (the sparsity it trains at).
_PLAN_FIELDS = ("n_out", "fan_in", "budget", "k0", "protected")
_FIX = "the checkpoint is corrupt or was edited: resume from an intact one (saved with updater.state_dict())"


class UpdaterState(Protocol):
    """What of an ``SRigLUpdater`` a checkpoint saves and restores (declared here, so that this module does not
    import the updater that imports it)."""

    config: SRigLConfig
    rule: MethodRule
    layers: dict[str, Any]
    step_count: int
    total_steps: int
    generator: torch.Generator
    explored: dict[str, torch.Tensor]
    start: dict[str, LayerStart]
    _tap: Any  # GradientTap: buffers (the open window) and sharded (FSDP2 layers)
    _window_skips: int


def updater_state(updater: UpdaterState) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": updater.step_count,
        "total_steps": updater.total_steps,
        "config": updater.config.to_dict(),
        "masks": {name: layer.mask.clone() for name, layer in updater.layers.items()},
        "plans": {name: layer.srigl_plan.to_dict() for name, layer in updater.layers.items()},
        "generator": updater.generator.get_state(),
        # whole tensors: a sharded weight's window is gathered (a collective), so any layout can resume it
        "grad_buffers": {name: whole_like(buf, updater.layers[name].weight).clone()
                         for name, buf in updater._tap.buffers.items()},
        "explored": {name: bits.clone() for name, bits in updater.explored.items()},
        "window_skips": updater._window_skips,
        "start": {name: start.to_list() for name, start in updater.start.items()},
    }


def _corrupt(field: str, problem: str, layer: str | None = None) -> CheckpointError:
    where = f"checkpoint field {field!r}" + (f", layer {layer!r}" if layer is not None else "")
    return CheckpointError(f"{where}: {problem}; {_FIX}")


def _check_fields(state: Any) -> None:
    if not isinstance(state, Mapping) or "masks" not in state:
        raise CheckpointError(
            "the checkpoint has no masks: it is not an SRigLUpdater.state_dict() (save one with "
            "updater.state_dict() next to the model and optimizer state)"
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(f"unknown updater checkpoint format {state.get('format')!r}; expected {FORMAT!r}")
    missing = [field for field in _FIELDS if field not in state]
    if missing:
        raise CheckpointError(f"the updater checkpoint lacks {missing}: it is truncated or was edited; save it "
                              "again with updater.state_dict()")
    for field in _LAYER_FIELDS:
        if not isinstance(state[field], Mapping):
            raise _corrupt(field, f"must map layer names to tensors, not {type(state[field]).__name__}")


_META = ("is on the meta device (a tensor without values); load the checkpoint with torch.load(..., "
         "map_location='cpu')")


def _check_run(updater: UpdaterState, state: Mapping[str, Any]) -> None:
    """config and total_steps must be this run's; step an int >= 0; generator a valid state."""
    try:
        saved_config = SRigLConfig.from_dict(state["config"])
    except (SRigLError, TypeError, ValueError, AttributeError) as err:
        raise _corrupt("config", f"is not an SRigLConfig.to_dict() ({err})") from None
    differing = [f for f in _TRAINING_FIELDS if getattr(saved_config, f) != getattr(updater.config, f)]
    if differing or state["total_steps"] != updater.total_steps:
        raise CheckpointError(
            f"the checkpoint was made with other training settings ({differing or 'total_steps'}); build the "
            "updater with the saved config (SRigLConfig.from_dict(state['config'])) and total_steps to resume"
        )
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise _corrupt("step", f"{step!r} must be an int >= 0 (optimizer steps taken)")
    skips = state.get("window_skips", 0)  # absent in checkpoints older than the field
    if isinstance(skips, bool) or not isinstance(skips, numbers.Integral) or not \
            0 <= skips <= updater.config.grad_accumulation_n:
        raise _corrupt("window_skips", f"{skips!r} must be an int in [0, grad_accumulation_n="
                                       f"{updater.config.grad_accumulation_n}] (skipped steps of the open window)")
    try:  # on a scratch generator: a state torch refuses must not reach the updater's
        torch.Generator().set_state(state["generator"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise _corrupt("generator", f"is not a torch.Generator state ({err})") from None


def _check_plan(name: str, layer: Any, saved_plan: Any) -> None:
    plan = layer.srigl_plan.to_dict()
    saved_plan = saved_plan if isinstance(saved_plan, Mapping) else {}
    differing = [f for f in _PLAN_FIELDS if saved_plan.get(f) != plan.get(f)]
    if differing:
        raise CheckpointError(
            f"layer {name!r}: the checkpoint's plan differs in {differing} "
            f"({[saved_plan.get(f) for f in differing]} against {[plan.get(f) for f in differing]}): it was made "
            "at another sparsity or distribution. Sparsify the model with the saved config "
            "(SRigLConfig.from_dict(state['config'])) to resume")


def _starts(updater: UpdaterState, state: Mapping[str, Any]) -> dict[str, LayerStart]:
    """The checkpoint's start records, checked (sparsify's where the checkpoint predates them)."""
    saved = state.get("start")
    if saved is None:
        return {name: sparsify_start(layer.srigl_plan) for name, layer in updater.layers.items()}
    if not isinstance(saved, Mapping) or set(saved) != set(updater.layers):
        raise _corrupt("start", "must map every sparse layer's name to [non-zeros, ablated neurons, fan-in]")
    starts = {}
    for name, layer in updater.layers.items():
        try:
            starts[name] = parse_start(saved[name], layer.srigl_plan, updater.rule.constant_fan_in)
        except ValueError as err:
            raise _corrupt("start", str(err), name) from None
    return starts


def _check_mask(updater: UpdaterState, name: str, layer: Any, mask: Any, start: LayerStart) -> None:
    """The mask the updater would hold: bool, the layer's shape, never empty, and the method's invariant from the
    masks the run started from (``start``)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise _corrupt("masks", f"must be a bool tensor, not {getattr(mask, 'dtype', type(mask).__name__)}", name)
    if mask.is_meta:
        raise _corrupt("masks", _META, name)
    if tuple(mask.shape) != tuple(layer.mask.shape):
        raise CheckpointError(f"layer {name!r}: checkpoint mask {tuple(mask.shape)} does not match the model's "
                              f"{tuple(layer.mask.shape)}")
    plan, nnz = layer.srigl_plan, int(torch.count_nonzero(mask))
    if nnz == 0:
        kind = "the output layer's (protected) mask" if plan.protected else "the mask"
        raise _corrupt("masks", f"{kind} is empty: no weight is active", name)
    if nnz > plan.budget:
        raise _corrupt("masks", f"holds {nnz} non-zeros, over the layer's budget of {plan.budget}", name)
    if updater.rule.constant_fan_in:
        _check_constant_fan_in(updater, name, layer, mask, start)
    elif nnz != start.nnz:  # RigL / SET move weights, never change their number
        whence = f" (sparsify's n_out x k0 = {plan.n_out} x {plan.k0})" if start == sparsify_start(plan) else ""
        raise _corrupt("masks", f"holds {nnz} non-zeros; {updater.config.method.value} keeps the number the run "
                                f"started with, {start.nnz}{whence}", name)


def _check_constant_fan_in(updater: UpdaterState, name: str, layer: Any, mask: torch.Tensor,
                           start: LayerStart) -> None:
    """The masks the run started from (``start``: k and ablated neurons), or, once an update has run, every active
    neuron at k = floor(budget / active neurons) inputs (``srigl_select``); neurons are ablated only by SRigL with
    ablation on, and never in a protected (output) layer; static masks never change."""
    plan = layer.srigl_plan
    try:
        k, ablated = check_constant_fan_in(layer.neuron_view(mask), layer=name)
    except InvariantError as err:
        raise _corrupt("masks", f"is not constant fan-in ({err})", name) from None
    n_ablated = int(torch.count_nonzero(ablated))
    if (k, n_ablated) == (start.k, start.ablated):
        return  # (where the run started: a pruned model's ablated neurons and k included)
    can_ablate = updater.rule.may_ablate(updater.config, plan)
    if n_ablated and not can_ablate:
        why = "a protected (output) layer" if plan.protected else f"{updater.config.method.value} without ablation"
        raise _corrupt("masks", f"neurons {ablated.nonzero().flatten().tolist()[:5]} have no inputs, but {why} "
                                "never ablates", name)
    if not updater.rule.updates:
        raise _corrupt("masks", f"has k {k} with {n_ablated} neurons ablated, but {updater.config.method.value} "
                                f"keeps the masks the run started with (k {start.k}, {start.ablated} ablated)", name)
    expected = plan.budget // (plan.n_out - n_ablated)
    if k != expected:
        raise _corrupt("masks", f"active neurons have fan-in {k}; with {plan.n_out - n_ablated} active the updater "
                                f"keeps k = budget // active = {plan.budget} // {plan.n_out - n_ablated} = {expected}",
                       name)


def _check_buffers(updater: UpdaterState, buffers: Mapping[str, Any], field: str = "grad_buffers") -> None:
    for name, buf in buffers.items():
        if name not in updater.layers:
            raise _corrupt(field, "is not a sparse layer of this model", name)
        shape = tuple(updater.layers[name].weight.shape)
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.float32 or tuple(buf.shape) != shape:
            got = f"{buf.dtype} {tuple(buf.shape)}" if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise _corrupt(field, f"must be float32 of the weight's shape {shape}, not {got}", name)
        if buf.is_meta:
            raise _corrupt(field, _META, name)
        if not bool(torch.isfinite(buf).all()):  # (a window saved from a diverged run would fail the next update)
            raise _corrupt(field, "has NaN/inf entries: the run diverged before it was saved; resume from an "
                                  "earlier checkpoint", name)


def _window_to_resume(updater: UpdaterState, state: Mapping[str, Any], sync: RankSync | None
                      ) -> dict[str, torch.Tensor]:
    """The gradient window this rank continues, whatever the saving run's layout and this one's.

    ``grad_buffers`` holds the saving rank's window: the whole window of a single-process run, and for weights
    sharded when saved (FSDP2) their window averaged over the ranks already. A distributed run's replicated (DDP)
    weights have each rank's own, unaveraged window in ``rank_grad_buffers``. A weight replicated when saved
    resumes its rank's own window where it is replicated now on as many ranks (bit-exact), else the mean of the
    ranks' (the average the update would take: a sharded weight's window is never averaged again, and one process
    averages nothing); a weight sharded when saved resumes the averaged window, in any layout now."""
    window = dict(state["grad_buffers"])
    by_rank = state.get("rank_grad_buffers")
    if by_rank is None:
        return window
    if not isinstance(by_rank, list) or not by_rank or not all(isinstance(b, Mapping) for b in by_rank):
        raise _corrupt("rank_grad_buffers", "must be a non-empty list of {layer: tensor}, one per rank")
    for buffers in by_rank:
        _check_buffers(updater, buffers, field="rank_grad_buffers")
    replicated = set().union(*by_rank)  # (weights replicated when saved; the rest of grad_buffers was sharded)
    same_ranks = sync is not None and len(by_rank) == sync.world_size
    resumed = {}
    for name in updater.layers:  # (in layer order on every rank: collectives later run over these in turn)
        if name not in replicated:
            if name in window:
                resumed[name] = window[name]
        elif same_ranks and name not in updater._tap.sharded:
            if name in by_rank[sync.rank]:  # (a rank whose layer got no gradient in the window has none)
                resumed[name] = by_rank[sync.rank][name]
        else:
            resumed[name] = sum(b[name] for b in by_rank if name in b) / len(by_rank)
    return resumed


def _check_explored(updater: UpdaterState, explored: Mapping[str, Any], masks: Mapping[str, Any]) -> None:
    if set(explored) != set(updater.layers):
        raise _corrupt("explored", f"covers layers {sorted(explored)[:5]}, not this model's "
                                   f"{sorted(updater.layers)[:5]}")
    for name, layer in updater.layers.items():
        bits, numel = explored[name], layer.mask.numel()
        size = -(-numel // 8)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or tuple(bits.shape) != (size,):
            got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise _corrupt("explored", f"must be uint8 of shape ({size},) (one bit per weight), not {got}", name)
        if bits.is_meta:
            raise _corrupt("explored", _META, name)
        if (masks[name].reshape(-1).cpu() & ~unpack_bits(bits.cpu(), numel)).any():
            raise _corrupt("explored", "misses weights active in the mask (every active weight was explored)", name)


def _check_compatible(updater: UpdaterState, state: Any) -> dict[str, LayerStart]:
    """Everything ``load_updater_state`` restores, checked before it restores anything; returns the start records
    (checked)."""
    _check_fields(state)
    saved, ours = set(state["masks"]), set(updater.layers)
    if saved != ours:
        raise CheckpointError(
            f"the checkpoint belongs to another model: layers only in the checkpoint {sorted(saved - ours)[:5]}, "
            f"only in this model {sorted(ours - saved)[:5]}"
        )
    _check_run(updater, state)
    for name, layer in updater.layers.items():
        _check_plan(name, layer, state["plans"].get(name))
    starts = _starts(updater, state)
    for name, layer in updater.layers.items():
        _check_mask(updater, name, layer, state["masks"][name], starts[name])
    _check_buffers(updater, state["grad_buffers"])
    _check_explored(updater, state["explored"], state["masks"])
    return starts


@torch.no_grad()
def load_updater_state(updater: UpdaterState, state: dict[str, Any], sync: RankSync | None = None) -> None:
    starts = _check_compatible(updater, state)
    window = _window_to_resume(updater, state, sync)
    for name, layer in updater.layers.items():
        layer.mask.copy_(state["masks"][name])
        layer.apply_mask_()
    updater.step_count = int(state["step"])
    updater.generator.set_state(state["generator"])
    updater._window_skips = int(state.get("window_skips", 0))
    updater._tap.buffers = {name: part_like(buf, updater.layers[name].weight).to(updater.layers[name].weight.device,
                                                                                 copy=True)
                            for name, buf in window.items()}
    updater.explored = {name: bits.clone() for name, bits in state["explored"].items()}
    updater.start = starts
