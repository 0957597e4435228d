"""Optimizer state of sparse weights: find it, and reset it where the mask changed to what it holds for a weight
that never had a gradient.

Any per-parameter state tensor shaped like the weight counts (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg`` /
``exp_avg_sq`` / ``max_exp_avg_sq``, RMSprop ``square_avg`` ...); scalars such as Adam's ``step`` are left alone.
The reference resets only SGD momentum, to zero. Zero is not every optimizer's resting value: Adamax's ``exp_inf``
rests at eps, Rprop's ``step_size`` at lr (a regrown weight reset to 0 crawled back from its minimum, 1e-6),
Adagrad's ``sum`` at ``initial_accumulator_value``. ``neutral_state`` finds each value by asking the optimizer's
class itself: a fresh one with the same settings, stepped once on a zero gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..nn.sharding import local_part, part_like

__all__ = ["state_tensors", "neutral_state", "reset_optimizer_state_", "differs_from_neutral"]

_NEUTRAL: dict[tuple, dict[str, float]] = {}


def state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in optimizer.state.get(param, {}).items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            yield key, value


def neutral_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, float]:
    """Each weight-shaped state entry's value for a weight that has had only zero gradients: what a new optimizer
    of ``optimizer``'s class and ``param``'s group settings holds after one step on a zero gradient. Entries it
    does not name (and every entry of an optimizer that cannot be made again from its settings) rest at 0."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return {}
    settings = {name: group[name] for name in optimizer.defaults if name in group}
    key = (type(optimizer), repr(sorted(settings.items())), param.dtype)
    if key not in _NEUTRAL:
        probe = torch.zeros(1, dtype=param.dtype, requires_grad=True)
        try:
            fresh = type(optimizer)([probe], **settings)
            probe.grad = torch.zeros_like(probe)
            fresh.step()
            state = fresh.state[probe]
        except Exception:  # (a user's optimizer that needs more than its defaults to be made: zeros, as before)
            state = {}
        _NEUTRAL[key] = {name: float(value.reshape(-1)[0]) for name, value in state.items()
                         if isinstance(value, torch.Tensor) and value.shape == probe.shape}
    return _NEUTRAL[key]


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Set every weight-shaped state tensor of ``param`` to its neutral value (``neutral_state``) at the positions
    ``where`` (bool, param's whole shape; a sharded state tensor is set in this rank's part)."""
    neutral = neutral_state(optimizer, param)
    for key, tensor in state_tensors(optimizer, param):
        local_part(tensor).masked_fill_(part_like(where, tensor), neutral.get(key, 0.0))


def differs_from_neutral(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                         mask: torch.Tensor) -> Iterator[str]:
    """The weight-shaped state entries of ``param`` that differ from their neutral value somewhere ``mask`` is
    False (this rank's part): state that would move, or has moved, a masked weight."""
    neutral = neutral_state(optimizer, param)
    for key, tensor in state_tensors(optimizer, param):
        part = local_part(tensor)
        if bool(torch.any((part != neutral.get(key, 0.0)) & ~part_like(mask, tensor))):
            yield key
