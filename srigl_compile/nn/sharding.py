"""Weights sharded by FSDP2 (``fully_shard``): DTensor parameters whose rank-local rows are all a rank holds.

Masks stay whole on every rank (FSDP2 shards parameters, not buffers): an update needs the whole layer anyway
(SRigL's magnitude threshold, ablation and k are decided per layer, not per row), and a bool mask is a quarter of
the fp32 weight. These helpers turn a whole, weight-shaped tensor into the part a rank holds and back; on plain
tensors they do nothing.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["is_sharded", "local_part", "whole", "part_like", "whole_like"]


def is_sharded(tensor: torch.Tensor) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported (fully_shard imports it): checking the loaded
    # module keeps its import (~0.4 s) out of `import srigl_compile`.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank stores (in place writes to it change the parameter)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def part_like(whole_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole_tensor``, laid out as ``like`` is sharded; no communication (every rank holds the
    whole tensor already)."""
    if not is_sharded(like):
        return whole_tensor
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(whole_tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return part.to_local()


def whole_like(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's ``part`` (sharded as ``like``): an all-gather."""
    if not is_sharded(like):
        return part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor()
