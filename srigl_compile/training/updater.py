"""SRigLUpdater: the mutable side of sparse training. Call ``updater.step()`` after every ``optimizer.step()``.

On an update step (t % delta_t == 0, t < T_end) it scores every sparse layer (``sparsity.scores``), selects new
masks (``sparsity.selection``: SRigL, RigL, SET), zeroes the weights of dropped and newly grown positions and
resets their optimizer state (``training.optim_state``: to what it holds for a weight without gradients), and
checks the invariants of every layer, raising ``InvariantError`` on any violation.

Example:
    >>> model = sparsify(net, SRigLConfig(sparsity=0.9))                          # doctest: +SKIP
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)          # doctest: +SKIP
    >>> updater = SRigLUpdater(model, opt, SRigLConfig(sparsity=0.9), total_steps=1000)  # doctest: +SKIP
    >>> for x, y in loader:                                                      # doctest: +SKIP
    ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); updater.step()
"""

from __future__ import annotations

import logging
import math
import numbers
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .._warnings import warn_user
from ..config import Method, SRigLConfig
from ..errors import ConfigError, InvariantError, LayerError
from ..nn.sharding import local_part, part_like, whole
from ..passes.sparsify import sparse_layers
from ..sparsity import (
    LayerScores,
    Selection,
    UpdateSchedule,
    check_constant_fan_in,
    magnitude_drop_scores,
    non_finite_weights,
    row_counts,
)
from . import checkpoint_state
from ._grad_hooks import GradientTap
from .exploration import pack_bits, unpack_bits
from .methods import method_rule
from .optim_state import differs_from_neutral, reset_optimizer_state_
from .rank_sync import resolve_rank_sync
from .run_start import start_of

__all__ = ["SRigLUpdater"]

log = logging.getLogger(__name__)


class SRigLUpdater:
    """Drives the masks of a sparsified model during training.

    Args:
        model: the output of ``sparsify`` (possibly wrapped, e.g. by DDP: layers are found by type).
        optimizer: holds every sparse weight. Its state of dropped and regrown weights is reset (any state tensor
            shaped like the weight: SGD momentum, Adam/AdamW moments ...).
        config: the training half of SRigLConfig (method, ablation, gamma_sal, alpha, delta_t, t_end_fraction,
            grad_accumulation_n, seed). Defaults to ``SRigLConfig()``.
        total_steps: optimizer steps of the whole run; T_end = floor(t_end_fraction * total_steps).
        grad_scaler: the run's ``torch.amp.GradScaler``, if any: recorded gradients are divided by the loss scale
            they were computed at. Steps the optimizer did not take (a scaler skipping inf/NaN gradients) are never
            recorded, with or without it: the updater hooks ``optimizer.step``.
        distributed: keep every rank's masks identical (the dense gradient averaged across ranks once per update,
            masks compared by checksum after each update). ``None``: on when torch.distributed is initialised with
            more than one rank. Every rank must hold the whole model (DDP); ``process_group`` picks the ranks.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SRigLConfig | None = None,
                 total_steps: int = 1, *, grad_scaler: torch.amp.GradScaler | None = None,
                 distributed: bool | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        self.config = config if config is not None else SRigLConfig()
        if not isinstance(self.config, SRigLConfig):
            raise ConfigError(f"config must be an SRigLConfig, not {type(self.config).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ConfigError(f"total_steps={total_steps!r} must be a positive integer (optimizer steps of the run)")
        optimizer = _unwrapped_optimizer(optimizer)
        self.layers = dict(sparse_layers(_unwrapped(model)))
        if not self.layers:
            raise LayerError("the model has no sparse layers: call srigl_compile.sparsify(model, config) first")
        self._check_not_frozen()  # (first: an optimizer built from trainable parameters lacks frozen weights too)
        self._check_optimizer(optimizer)
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError(f"grad_scaler must be the torch.amp.GradScaler the training loop scales its loss with, "
                            f"not {type(grad_scaler).__name__}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.rule = method_rule(self.config.method)
        self.schedule = UpdateSchedule(
            self.config.delta_t, math.floor(self.config.t_end_fraction * total_steps), self.config.alpha,
            self.config.grad_accumulation_n,
        )
        # A stream of its own (seed + 1), so SET's regrowth does not replay sparsify's initial draws.
        self.generator = torch.Generator().manual_seed(self.config.seed + 1)
        self.step_count = 0
        self.explored = {name: pack_bits(layer.mask) for name, layer in self.layers.items()}
        self.start = {name: start_of(layer) for name, layer in self.layers.items()}  # (what checkpoints check against)
        self._sync = resolve_rank_sync(distributed, process_group)
        self._replaced = False  # (set when a newer updater takes these layers over: step() then refuses)
        self._weights = {name: layer.weight for name, layer in self.layers.items()}
        self._take_over_layers()
        for layer in self.layers.values():  # (state left from dense training, e.g. momentum, would move them)
            reset_optimizer_state_(optimizer, layer.weight, ~layer.mask)
        self._tap = GradientTap(self.layers, self.config.grad_accumulation_n,
                                loss_scale=grad_scaler.get_scale if grad_scaler is not None else None)
        self._optimizer_stepped = False
        self._window_skips = 0  # steps of the open window the optimizer skipped
        self._step_hooks = [optimizer.register_step_pre_hook(lambda *_: self._tap.before_optimizer_step()),
                            optimizer.register_step_post_hook(self._on_optimizer_step)]
        self._warned_unused: set[str] = set()
        for layer in self.layers.values():
            _DRIVEN[layer] = weakref.ref(self)
        self._warn_if_never_updating()
        self._warn_if_threshold_unreachable()
        if self._sync is not None:
            self._sync.check_same_masks(self._masks(), self.step_count)
        self._open_window()

    @property
    def _needs_gradients(self) -> bool:
        return self.rule.needs_gradients

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers.items() if id(layer.weight) not in held]
        if missing:
            raise ConfigError(
                f"the optimizer does not hold the weights of sparse layers {missing[:5]}: build it from the "
                "sparsified model's parameters (sparsify returns a copy unless inplace=True)"
            )

    def _check_not_frozen(self) -> None:
        """Refuse frozen weights: the updater masks their gradients and reads them."""
        frozen = [name for name, layer in self.layers.items() if not layer.weight.requires_grad]
        if frozen:
            raise LayerError(f"sparse layers {frozen[:5]} have frozen weights (requires_grad=False): the updater "
                             "masks and reads their gradients; unfreeze them, or keep them dense when sparsifying "
                             f"(SRigLConfig.overrides={{{frozen[0]!r}: None}})")

    def _take_over_layers(self) -> None:
        """Close another live updater driving these layers (two would each update the masks): its step() then
        refuses. Called once every argument is checked, so a refused updater leaves the old one working."""
        others = {id(other): other for layer in self.layers.values()
                  if (mark := _DRIVEN.get(layer)) is not None and (other := mark()) is not None}
        for other in others.values():
            other.close()
            other._replaced = True
            warn_user("an SRigLUpdater on these layers existed already: this one replaces it (its hooks are removed "
                      "and its step() refuses); to resume, load_state_dict the old one's state_dict here")

    def _warn_if_never_updating(self) -> None:
        if self.rule.updates and self.schedule.next_update_step(1) is None:
            warn_user(f"the masks will never be updated: the first update would come at step delta_t="
                      f"{self.config.delta_t}, but they freeze at T_end = t_end_fraction x total_steps = "
                      f"{self.config.t_end_fraction} x {self.total_steps} = {self.schedule.t_end}; this trains as "
                      f"method='static'. Lower delta_t or train for more steps.")

    def _warn_if_threshold_unreachable(self) -> None:
        """A gamma_sal count above a layer's fan-in: no neuron can reach it, so every update ablates as many
        neurons as the budget lets it (selection's safety clamp), which is seldom what was meant."""
        if self.config.gamma_sal < 1:
            return
        over = [name for name, layer in self.layers.items()
                if self.rule.may_ablate(self.config, layer.srigl_plan)
                and self.config.gamma_sal > layer.srigl_plan.fan_in]
        if over:
            warn_user(f"gamma_sal={self.config.gamma_sal:g} salient weights per neuron exceeds the dense fan-in of "
                      f"layers {over[:5]}{' ...' if len(over) > 5 else ''}: no neuron can reach it, so every update "
                      "ablates as many of their neurons as the budget allows. gamma_sal below 1 is a fraction of k "
                      "(the paper's 0.3)")

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_stepped = True

    def _masks(self) -> dict[str, torch.Tensor]:
        return {name: layer.mask for name, layer in self.layers.items()}

    def _open_window(self) -> None:
        self._tap.active = self._needs_gradients and self.schedule.accumulates(self.step_count + 1)

    @torch.no_grad()
    def step(self) -> bool:
        """Advance one optimizer step; update the masks when due. Returns whether the masks were updated."""
        if self._replaced:
            raise ConfigError("this SRigLUpdater was replaced by a newer one built on the same layers: call step() "
                              "on that one (two updaters would each update the masks)")
        # No per-step weight masking: masked gradients and resting optimizer state keep masked weights exactly zero
        # under SGD/Adam/AdamW (weight decay of a zero is zero); an optimizer that moves them (Muon's dense update)
        # is caught, loudly, at the next update, or every delta_t steps where none comes (static, past T_end).
        self._check_weights_unchanged()
        self.step_count += 1
        if self.step_count == self.total_steps + 1:
            warn_user(f"SRigLUpdater.step() called past total_steps={self.total_steps}: the masks froze at T_end = "
                      f"{self.schedule.t_end} and stay frozen; if the run is longer, build the updater with its "
                      "real total_steps (the update schedule is scaled by it)")
        self._record_step_gradient()
        due = self.rule.updates and self.schedule.is_update_step(self.step_count)
        updated = self._update(self.step_count) if due else False
        if not due and self.step_count % self.config.delta_t == 0:
            self._check_masked_weights_zero(self.step_count, "check")
        self._open_window()
        return updated

    def _check_weights_unchanged(self) -> None:
        """The hooks sit on the weights the updater was built with; wrapping that replaces them (fully_shard)
        would leave the new ones unmasked and unrecorded."""
        for name, layer in self.layers.items():
            if layer.weight is not self._weights[name]:
                raise ConfigError(f"layer {name!r}: its weight was replaced after the updater was built (by "
                                  "fully_shard, or by assigning a new Parameter): build the optimizer and the "
                                  "SRigLUpdater after wrapping the model")

    def _record_step_gradient(self) -> None:
        """The step's dense gradient joins the window only if the optimizer took the step (GradScaler skips
        steps whose gradients overflowed; their gradients hold inf/NaN and say nothing about the weights)."""
        if self._optimizer_stepped:
            self._tap.commit()
        elif self._tap.pending:
            self._tap.discard()
            self._window_skips += 1
            log.info("step %d: the optimizer did not step (a loss scaler skipped it?); its gradient is not recorded",
                     self.step_count)
        self._optimizer_stepped = False

    # -- one mask update -----------------------------------------------------------------------------------
    def _layers_to_update(self, t: int) -> dict[str, nn.Module]:
        """The layers whose masks change at step t. A layer that got no gradient in the window while others did
        does not reach the loss (a pooler whose output the loss ignores): with nothing to grow by, its mask stays,
        with a warning. No gradient anywhere is a training-loop mistake, raised by ``compute_scores``."""
        if not self.rule.needs_gradients:
            return self.layers
        unused = [name for name in self.layers if not self._tap.has(name)]
        frozen = [name for name in unused if not self.layers[name].weight.requires_grad]
        if not unused or (len(unused) == len(self.layers) and len(frozen) < len(unused)):
            return self.layers  # (none unused; or no gradient anywhere, not for freezing: compute_scores raises)
        if set(unused) != self._warned_unused:
            self._warned_unused = set(unused)
            if frozen:
                warn_user(f"layers {frozen} were frozen (requires_grad=False) after the updater was built: they get "
                          f"no gradient, so their masks are left as they are from step {t} on")
            if reached := [name for name in unused if name not in frozen]:
                warn_user(f"layers {reached} got no gradient since the last mask update at step {t}: their output "
                          "does not reach the loss, so their masks are left as they are. Leave them out of sparsify "
                          "(filter_fn) if the model does not use them in training.")
        return {name: layer for name, layer in self.layers.items() if name not in unused}

    def compute_scores(self, name: str, layer: nn.Module) -> LayerScores:
        """Drop and grow scores of one layer (a distributed trainer can average these across ranks)."""
        drop = magnitude_drop_scores(layer.neuron_view(whole(layer.weight)), layer.neuron_view(layer.mask), name)
        dense_grad = self._tap.take(name) if self.rule.needs_gradients else None
        if self.rule.needs_gradients and dense_grad is None:
            raise InvariantError(
                f"layer {name!r}: no dense gradient was recorded before the mask update at step {self.step_count}; "
                "call loss.backward() and optimizer.step() before every updater.step() (no layer got one)"
            )
        grad_view = layer.neuron_view(dense_grad) if dense_grad is not None else None
        return LayerScores(drop, self.rule.grow_scores(grad_view, drop.shape, name, self.generator))

    def select(self, layer: nn.Module, scores: LayerScores, drop_fraction: float) -> Selection:
        return self.rule.select(layer.neuron_view(layer.mask), scores, layer.srigl_plan, drop_fraction, self.config)

    def _check_masked_weights_zero(self, t: int, when: str) -> None:
        for name, layer in self.layers.items():
            if _nonzero_outside(layer.weight.detach(), layer.mask):
                raise InvariantError(
                    f"layer {name!r}: weights outside its mask are not zero at the mask {when} of step {t}: "
                    "something changed masked weights since the last check: code writing the weights (write "
                    "them through the mask, weight * mask), an optimizer that moves weights whose gradients are "
                    "zero (Muon's dense update; momentum left from before sparsify is reset when the updater is "
                    "built), or ranks of a distributed run holding different masks (distributed=False)")

    def _update(self, t: int) -> bool:
        """The mask update of step t; returns whether any mask was updated (not where the window had no step, or
        every layer was frozen)."""
        try:  # (now: the update zeroes what it drops, erasing the sign)
            self._check_masked_weights_zero(t, "update")
            error = None
        except InvariantError as err:
            error = err
        if self._sync is not None:  # (every rank stops together: a rank raising alone leaves the others waiting)
            failed = self._sync.check_ready(self._masks(), t, error is not None)
            if failed and error is None:
                raise InvariantError(f"ranks {failed} failed their checks before the mask update of step {t} (their "
                                     "errors say why): this rank stops with them")
        if error is not None:
            raise error
        if self._sync is not None and self._needs_gradients:
            self._average_replicated_windows()
        if self._needs_gradients and not self._tap.buffers and self._window_skips:
            warn_user(f"mask update at step {t} skipped: the optimizer this updater was built with took none of the "
                      f"{self._window_skips} steps of its gradient window: a GradScaler skipped them (loss-scale "
                      "overflow), or another optimizer steps the model now (build a new SRigLUpdater with it, and "
                      "load_state_dict this one's state_dict there); the masks stay as they are until the next "
                      "update")
            updated = False
        else:
            drop_fraction = self.schedule.drop_fraction(t)
            layers = self._layers_to_update(t)
            for name, layer in layers.items():
                selection = self.select(layer, self.compute_scores(name, layer), drop_fraction)
                self._apply(name, layer, selection)
            log.debug("mask update at step %d, drop fraction %.4f", t, drop_fraction)
            updated = bool(layers)
        self._tap.release()
        self._window_skips = 0
        self.check_invariants()
        if self._sync is not None:
            self._sync.check_same_masks(self._masks(), t)
        return updated

    def _average_replicated_windows(self) -> None:
        """Average the windows of replicated (DDP) weights over the ranks; sharded (FSDP2) weights' gradients were
        averaged by their reduce-scatter already."""
        replicated = {name: layer.weight.shape for name, layer in self.layers.items() if name not in self._tap.sharded}
        if not replicated:
            return
        buffers = self._tap.buffers
        averaged = self._sync.average_gradients({n: b for n, b in buffers.items() if n in replicated}, replicated)
        self._tap.buffers = averaged | {name: buf for name, buf in buffers.items() if name not in replicated}

    def _apply(self, name: str, layer: nn.Module, selection: Selection) -> None:
        old = layer.neuron_view(layer.mask).clone()
        new = selection.new_mask
        newly_grown = new & ~old
        # Dropped weights become 0, newly grown start at 0; dropped-then-regrown keep their value (as in RigL).
        reset = ~new | newly_grown
        # Weight-shaped masks: the weight or its gradient may be channels_last. A sharded weight, its gradient and
        # optimizer state are written in this rank's part.
        weight, shape = layer.weight, layer.weight.shape
        local_part(weight).masked_fill_(part_like(reset.reshape(shape), weight), 0)
        layer.mask.copy_(new.reshape(shape))
        if weight.grad is not None:
            local_part(weight.grad).masked_fill_(part_like(~new.reshape(shape), weight.grad), 0)
        reset_optimizer_state_(self.optimizer, weight, reset.reshape(shape))
        explored = unpack_bits(self.explored[name], new.numel()) | new.reshape(-1)
        self.explored[name] = pack_bits(explored)

    # -- invariants -----------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise InvariantError unless every layer is consistent; called after every mask update."""
        for name, layer in self.layers.items():
            mask = layer.neuron_view(layer.mask)
            if self.rule.constant_fan_in:
                k, ablated = check_constant_fan_in(mask, layer=name)
                plan = layer.srigl_plan
                if k * int((~ablated).sum()) > plan.budget:
                    raise InvariantError(f"{name}: {k} x {int((~ablated).sum())} non-zeros exceed budget {plan.budget}")
                if plan.protected and ablated.any():
                    raise InvariantError(f"{name}: a protected (output) layer has ablated neurons")
            if not bool(torch.isfinite(local_part(layer.weight.detach())).all()):  # (this rank's part)
                raise InvariantError(non_finite_weights(name, "at an invariant check"))
            if _nonzero_outside(layer.weight.detach(), layer.mask):
                raise InvariantError(f"{name}: weights outside the mask are not zero")
            if layer.weight.grad is not None and _nonzero_outside(layer.weight.grad, layer.mask):
                raise InvariantError(f"{name}: gradients outside the mask are not zero")
            for key in differs_from_neutral(self.optimizer, layer.weight, layer.mask):
                raise InvariantError(f"{name}: optimizer state {key!r} outside the mask is not what it holds for a "
                                     "weight without gradients (0 for momentum and Adam's moments)")

    # -- reporting and checkpoints ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per layer: k, active and ablated neurons, density; globally: density and fraction ever explored, over the
        sparse layers (the ones the target sparsity is spread over; layers kept dense, biases and norms not counted)."""
        layers, nnz_total, numel_total, explored_total = {}, 0, 0, 0
        for name, layer in self.layers.items():
            counts = row_counts(layer.mask)
            active = counts > 0
            nnz, numel = int(counts.sum()), layer.mask.numel()
            explored = int(torch.count_nonzero(unpack_bits(self.explored[name], numel)))
            layers[name] = {
                "k": int(counts.max()) if self.rule.method is Method.SRIGL else None,
                "min_fan_in": int(counts[active].min()) if active.any() else 0,
                "max_fan_in": int(counts.max()),
                "fan_in": layer.srigl_plan.fan_in,
                "active_neurons": int(active.sum()),
                "ablated_neurons": int((~active).sum()),
                "density": nnz / numel,
                "nnz": nnz,
                "budget": layer.srigl_plan.budget,
                "explored_fraction": explored / numel,
            }
            nnz_total, numel_total, explored_total = nnz_total + nnz, numel_total + numel, explored_total + explored
        return {
            "step": self.step_count,
            "layers": layers,
            "global": {"density": nnz_total / numel_total, "explored_fraction": explored_total / numel_total},
        }

    def state_dict(self) -> dict[str, Any]:
        """Explicit fields: step, masks by layer name, generator state, config, gradient buffers, exploration.

        Distributed, every rank must call it (a collective): each rank's open gradient window is gathered into
        ``rank_grad_buffers``, so the checkpoint one rank saves resumes every rank bit for bit.
        """
        state = checkpoint_state.updater_state(self)
        if self._sync is not None:
            replicated = {n: b for n, b in self._tap.buffers.items() if n not in self._tap.sharded}
            state["rank_grad_buffers"] = self._sync.gather_buffers(replicated)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; raises CheckpointError (changing nothing) if any field does not fit."""
        checkpoint_state.load_updater_state(self, state, self._sync)
        self._open_window()

    def close(self) -> None:
        """Remove the gradient and optimizer hooks (the model's gradients are no longer masked afterwards)."""
        self._tap.close()
        for hook in self._step_hooks:
            hook.remove()
        for layer in self.layers.values():
            if (mark := _DRIVEN.get(layer)) is not None and mark() is self:
                del _DRIVEN[layer]


# sparse layer -> the live updater driving it (a weak mapping: copies of a model are not driven, nor pickled marks)
_DRIVEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrapped_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself: wrappers such as accelerate's AcceleratedOptimizer (what a Hugging Face Trainer
    callback is given) hold it as ``.optimizer`` and call its step, where the updater's hooks sit."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) or not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the sparse model's parameters (or a "
                        f"wrapper holding one as .optimizer), not {type(optimizer).__name__}")
    return optimizer


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers, so layer names (and checkpoints) do not depend
    on them."""
    while True:
        wrapper = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        inner = getattr(model, "module", None) if wrapper else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _nonzero_outside(tensor: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``tensor`` (this rank's part, if sharded) is non-zero anywhere the whole ``mask`` is False."""
    return bool(torch.any((local_part(tensor) != 0) & ~part_like(mask, tensor)))
