"""Keeping the updater's decisions identical on every rank of a data-parallel run (DDP, or any torch.distributed
group where every rank holds the whole model).

The gradient hooks see each rank's *local* gradient (they run before DDP's all-reduce), so the recorded dense
gradients differ between ranks; everything else the updater reads (weights, masks, its generator, seeded alike on
every rank) is already identical. One all-reduce per update window therefore suffices: the recorded gradients of
all layers, flattened into one float32 tensor, averaged like DDP averages gradients. The recorded gradient is
averaged rather than the grow scores: the score is |mean gradient|, which a mean of |local gradient| is not, and
both are the size of the weight, so neither moves fewer bytes.

After every update the ranks compare a checksum of every mask (one small all-reduce), so a divergence is an
``InvariantError`` naming the layer instead of a silent drift. Before an update's collectives they agree on the
step and on whether any rank's own checks failed (``check_ready``): a rank raising alone would leave the others
waiting in the window's all-reduce, so every rank stops, the others naming the ranks that failed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..errors import ConfigError, InvariantError

__all__ = ["RankSync", "resolve_rank_sync"]

_MIX = 0x45D9F3B  # (an integer hash's multiplier: 32-bit values times it stay below 2**59, no int64 overflow)
_LOW32 = 0xFFFFFFFF
_DIFFERENT_STEPS = ("the ranks are at different updater steps ({low} to {high}): call updater.step() once per "
                    "optimizer step on every rank")


class RankSync:
    """Collectives of the updater over one process group (every rank a full replica of the model)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def average_gradients(self, buffers: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]
                          ) -> dict[str, torch.Tensor]:
        """The mean over ranks of each layer's recorded gradient, in one all-reduce.

        A layer with no gradient on some rank counts as zero there (as DDP counts an unused parameter); a layer with
        no gradient on any rank stays absent, so every rank agrees on which layers reached the loss.
        """
        names = list(shapes)
        device = next((buf.device for buf in buffers.values()), torch.device("cpu"))
        pieces = [buffers[name].reshape(-1).float() if name in buffers
                  else torch.zeros(shapes[name].numel(), device=device) for name in names]
        present = torch.tensor([float(name in buffers) for name in names], device=device)
        flat = torch.cat(pieces + [present])
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        reached = flat[-len(names):] > 0
        averaged, offset = {}, 0
        for i, (name, piece) in enumerate(zip(names, pieces)):
            if reached[i]:
                averaged[name] = flat[offset:offset + piece.numel()].view(shapes[name]).clone()
            offset += piece.numel()
        return averaged

    def gather_buffers(self, buffers: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's open gradient window (index = rank), for a checkpoint that resumes bit for bit."""
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, {name: buf.cpu() for name, buf in buffers.items()}, group=self.group)
        return gathered

    def check_ready(self, masks: Mapping[str, torch.Tensor], step: int, failed: bool) -> list[int]:
        """Before an update's collectives, one small all-reduce: the ranks whose own checks ``failed`` (returned:
        every rank then stops); InvariantError where the ranks are at different steps."""
        flags = torch.zeros(self.world_size + 2, dtype=torch.int64, device=_device_of(masks))
        flags[self.rank], flags[-2], flags[-1] = int(failed), step, -step
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        flags = flags.cpu()
        if int(flags[-2]) != -int(flags[-1]):
            raise InvariantError(_DIFFERENT_STEPS.format(low=-int(flags[-1]), high=int(flags[-2])))
        return [rank for rank in range(self.world_size) if flags[rank]]

    def check_same_masks(self, masks: Mapping[str, torch.Tensor], step: int) -> None:
        """Raise InvariantError naming the first layer whose mask differs between ranks (or if the steps do)."""
        names = list(masks)
        device = _device_of(masks)
        # Each checksum is computed where its mask lives; only 3 numbers a layer move.
        sums = torch.stack([_checksum(masks[name]).to(device) for name in names]
                           + [torch.tensor([step, step, step], device=device)])
        # One all-reduce gives both extremes: max over ranks of (s, -s) is (max s, -min s).
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[: len(sums)].cpu(), -both[len(sums):].cpu()
        differs = (high != low).any(dim=1)
        if bool(differs[-1]):
            raise InvariantError(_DIFFERENT_STEPS.format(low=int(low[-1, 0]), high=int(high[-1, 0])))
        for i, name in enumerate(names):
            if differs[i]:
                raise InvariantError(
                    f"layer {name!r}: its mask differs between ranks (checksums {low[i].tolist()} to "
                    f"{high[i].tolist()}). Every rank must sparsify with the same seed and call updater.step() after "
                    "the same optimizer steps")


def _checksum(mask: torch.Tensor) -> torch.Tensor:
    """[count, sum of positions, sum of a 32-bit hash of each position] of the set entries: int64, on the mask's
    device. (Sums of powers of the positions alone miss sets with equal power sums, {1, 5, 6} and {2, 3, 7}: a
    probe found rows 6 entries apart passing.)"""
    positions = torch.nonzero(mask.reshape(-1)).reshape(-1).to(torch.int64)
    mixed = positions & _LOW32
    for _ in range(2):
        mixed = (((mixed >> 16) ^ mixed) * _MIX) & _LOW32
    mixed = (mixed >> 16) ^ mixed
    return torch.stack([positions.new_tensor(positions.numel()), positions.sum(), mixed.sum()])


def _device_of(masks: Mapping[str, torch.Tensor]) -> torch.device:
    """Where the collectives run: NCCL takes only CUDA tensors, gloo takes CPU ones."""
    backend = dist.get_backend()
    return next(iter(masks.values())).device if backend == "nccl" else torch.device("cpu")


def resolve_rank_sync(distributed: bool | None, group: dist.ProcessGroup | None) -> RankSync | None:
    """``distributed=None``: synchronise when torch.distributed is initialised with more than one rank."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size(group) > 1
    if not distributed:
        return None
    if not initialised:
        raise ConfigError("distributed=True but torch.distributed is not initialised: call "
                          "torch.distributed.init_process_group first (torchrun does the rest)")
    return RankSync(group)
