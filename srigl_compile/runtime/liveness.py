"""Which bytes a recorded forward reads again: pure bookkeeping over the calls' tensors, no kernels, no TVM.

A recording (``runtime.call_record``) is a list of calls, each touching tensors: ranges of memory addresses (so
two storages on the same memory, e.g. a tensor and ``torch.from_numpy`` of its array, are seen to overlap). Per
call, an ``Access`` lists the ranges it reads, the ones it overwrites whole without reading first (a kernel's
output, a functional op's result: contiguous tensors, so their range is exactly what is written) and any other
writes (strided outputs, whose gaps keep what they held). Whether a value is dead after a call, or was produced
by the forward itself, follows from the ranges alone; unknown is answered "no" (live, not produced), so an answer
of yes is safe.

Example:
    >>> a = Extent(1024, 1088)
    >>> calls = [Access(kills=(a,)), Access(reads=(a,)), Access(kills=(a,))]
    >>> producer(calls, 1, a), dead_after(calls, 1, a, outputs=())
    (0, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

__all__ = ["Extent", "Access", "extent", "extents", "producer", "dead_after", "never_rewritten"]


@dataclasses.dataclass(frozen=True)
class Extent:
    """Memory addresses [start, end), in bytes."""

    start: int
    end: int

    def overlaps(self, other: Extent) -> bool:
        return self.start < other.end and other.start < self.end

    def covers(self, other: Extent) -> bool:
        return self.start <= other.start and other.end <= self.end


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
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return Extent(start, start + (last + 1) * tensor.element_size())


def extents(tensors: Iterable[torch.Tensor]) -> tuple[Extent, ...]:
    """The extents of those tensors that have elements."""
    return tuple(e for e in map(extent, tensors) if e is not None)


def producer(calls: Sequence[Access], index: int, target: Extent) -> int | None:
    """The call of the same forward before call ``index`` that wrote the value in ``target`` whole (after which
    calls only read or updated it); None when there is none: a parameter, an input or a leftover."""
    for earlier in range(index - 1, -1, -1):
        access = calls[earlier]
        if any(kill.covers(target) for kill in access.kills):
            return earlier
        if any(other.overlaps(target) for other in (*access.kills, *access.writes)):
            return None  # part of it written by another value, or strided
    return None


def dead_after(calls: Sequence[Access], index: int, target: Extent, outputs: Iterable[Extent]) -> bool:
    """Whether no byte of ``target`` is read after call ``index`` before being overwritten whole, and none is
    part of the forward's ``outputs``."""
    live = [(target.start, target.end)]  # the bytes still holding the value: disjoint, sorted ranges
    for access in calls[index + 1:]:
        if any(_touches(live, read) for read in access.reads):
            return False
        for kill in access.kills:
            live = _without(live, kill.start, kill.end)
        if not live:
            return True
    return not any(_touches(live, out) for out in outputs)


def never_rewritten(calls: Sequence[Access], in_place: Sequence[bool], candidates: Iterable[int]) -> set[int]:
    """Those of the ``candidates`` (calls whose result depends on no tensor: ``arange``, ``scalar_tensor``) whose
    results no later call writes any byte of: a replay would write them with the values they hold already. A
    call ``in_place`` may write what it reads."""
    kept = set()
    for index in candidates:
        made = (*calls[index].kills, *calls[index].writes)
        later = calls[index + 1:]
        if not any(other.overlaps(target) for target in made for access, changes in zip(later, in_place[index + 1:])
                   for other in (*access.kills, *access.writes, *(access.reads if changes else ()))):
            kept.add(index)
    return kept


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
