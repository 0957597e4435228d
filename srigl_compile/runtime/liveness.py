"""Which bytes a recorded forward reads again: pure bookkeeping over the calls' tensors, no kernels, no TVM.

A recording (``runtime.call_record``) is a list of calls, each touching tensors: byte ranges of storages. Per
call, an ``Access`` lists the ranges it reads, the ones it overwrites whole without reading first (a kernel's
output, a functional op's result: contiguous tensors, so their range is exactly what is written) and any other
writes (strided outputs, whose gaps keep what they held). Whether a value is dead after a call, or was produced
by the forward itself, follows from the ranges alone; unknown is answered "no" (live, not produced), so an answer
of yes is safe.

Example:
    >>> a = Extent(1, 0, 64)
    >>> calls = [Access(kills=(a,)), Access(reads=(a,)), Access(kills=(a,))]
    >>> produced_before(calls, 1, a), dead_after(calls, 1, a, outputs=())
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

__all__ = ["Extent", "Access", "extent", "produced_before", "dead_after"]


@dataclasses.dataclass(frozen=True)
class Extent:
    """Bytes [start, end) of one storage (``storage``: its identity)."""

    storage: int
    start: int
    end: int

    def overlaps(self, other: Extent) -> bool:
        return self.storage == other.storage and self.start < other.end and other.start < self.end

    def covers(self, other: Extent) -> bool:
        return self.storage == other.storage and self.start <= other.start and other.end <= self.end


@dataclasses.dataclass(frozen=True)
class Access:
    """What one call touches: ``reads`` (read, or read and written), ``kills`` (written whole before any read of
    them) and ``writes`` (other writes)."""

    reads: tuple[Extent, ...] = ()
    kills: tuple[Extent, ...] = ()
    writes: tuple[Extent, ...] = ()


def extent(tensor: torch.Tensor) -> Extent | None:
    """The bytes from ``tensor``'s first element to past its last (None when it has none)."""
    if tensor.numel() == 0:
        return None
    size = tensor.element_size()
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.storage_offset() * size
    return Extent(tensor.untyped_storage()._cdata, start, start + (last + 1) * size)


def produced_before(calls: Sequence[Access], index: int, target: Extent) -> bool:
    """Whether the value in ``target`` when call ``index`` runs was written whole by an earlier call of the same
    forward (after which calls only read or updated it): not a parameter, an input or a leftover."""
    for access in reversed(calls[:index]):
        if any(kill.covers(target) for kill in access.kills):
            return True
        if any(other.overlaps(target) for other in (*access.kills, *access.writes)):
            return False  # part of it written by another value, or strided
    return False


def dead_after(calls: Sequence[Access], index: int, target: Extent, outputs: Iterable[Extent]) -> bool:
    """Whether no byte of ``target`` is read after call ``index`` before being overwritten whole, and none is
    part of the forward's ``outputs``."""
    live = [(target.start, target.end)]  # the bytes still holding the value: disjoint, sorted ranges
    for access in calls[index + 1:]:
        if any(_touches(live, read) for read in access.reads if read.storage == target.storage):
            return False
        for kill in access.kills:
            if kill.storage == target.storage:
                live = _without(live, kill.start, kill.end)
        if not live:
            return True
    return not any(_touches(live, out) for out in outputs if out.storage == target.storage)


def _touches(live: list[tuple[int, int]], other: Extent) -> bool:
    return any(start < other.end and other.start < end for start, end in live)


def _without(live: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    kept = []
    for first, last in live:
        if last <= start or end <= first:
            kept.append((first, last))
            continue
        if first < start:
            kept.append((first, start))
        if end < last:
            kept.append((end, last))
    return kept
