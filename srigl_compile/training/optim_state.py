"""Optimizer state of sparse weights: find it and reset it where the mask changed.

Any per-parameter state tensor shaped like the weight counts (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg`` /
``exp_avg_sq`` / ``max_exp_avg_sq``, RMSprop ``square_avg`` ...); scalars such as Adam's ``step`` are left alone.
The reference resets only SGD momentum.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..nn.sharding import local_part, part_like

__all__ = ["state_tensors", "reset_optimizer_state_"]


def state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in optimizer.state.get(param, {}).items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            yield key, value


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every weight-shaped state tensor of ``param`` at the positions ``where`` (bool, param's whole shape;
    a sharded state tensor is zeroed in this rank's part)."""
    for _, tensor in state_tensors(optimizer, param):
        local_part(tensor).masked_fill_(part_like(where, tensor), 0)
