"""Per-thread buffers for the kernels: scratch for their temporaries (packed batch tiles, padded and phase-split
images, uncropped convolution outputs) and recycled storage for their results.

Why: a CPU tensor of more than 32 MiB is mmapped fresh by the allocator on every call and page-faulted in on first
touch, and smaller ones are too once glibc has trimmed its heap. For ViT-B's fc2 at batch 64 (12608 rows) the
155 MiB of packed tiles cost ~66 ms of page faults against ~15 ms of writing them; a fresh 16x256x56x56 result
costs 11.5 ms to allocate and fill against 1.3 ms to fill one already mapped. Dense runtimes plan their memory in
arenas; a lowered model runs eagerly, so:
- ``scratch(slot, shape)``: each thread keeps one buffer per slot, grown to the largest request and reused; a call
  never returns a view of one.
- ``result(shape)``: a result the caller owns, from ``RECYCLE_FROM_BYTES`` on carved from a buffer of an earlier
  result that nothing references any more (its storage's use count says so: no tensor, view, numpy array or DLPack
  capsule holds it), else newly allocated and kept for later calls (at most ``RECYCLED_PER_SIZE`` per size, for
  the ``RECYCLED_SIZES`` sizes asked for most recently: inputs of ever new shapes would otherwise grow the pool
  without end). Of the free buffers, the one handed out last: it was written and read most recently, so it is
  likeliest still in cache, and the stores into it do not fetch their lines from memory first.
- While a CPU graph records (``held_by_recording``), results from ``RECORDING_RECYCLE_FROM_BYTES`` on are
  recycled too: a recording keeps every buffer it touched, so each smaller result would be a buffer of its own,
  written cold on every replay, where recycled ones are written while still in cache. (Eager calls keep the higher
  threshold: for them malloc's heap reuses small blocks anyway, without the reference counting.)

The buffers stay allocated after the call (that is the point); ``release_scratch()`` frees the calling thread's.

Example:
    >>> tiles = scratch("tiles", (4, 3072, 64))       # float32, uninitialised, valid until the next request
    >>> y = result((64, 256, 56, 56))                 # the caller's until it drops every reference to it
    >>> release_scratch()                             # e.g. after a one-off large batch
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading

import torch
import torch.nn.functional as F

__all__ = ["scratch", "result", "release_scratch", "scratch_bytes", "pad_images", "held_by_recording", "users_besides",
           "give_up", "MMAPPED_BYTES", "RECYCLE_FROM_BYTES", "RECYCLED_PER_SIZE", "RECYCLED_SIZES",
           "RECORDING_RECYCLE_FROM_BYTES"]

_LOCAL = threading.local()  # .buffers: {(slot, dtype): 1-D tensor}; .results: {(numel, dtype): [1-D tensor]}
MMAPPED_BYTES = 32 * 2**20  # glibc's largest mmap threshold: fresh tensors from this size fault in on every call
RECYCLE_FROM_BYTES = 2**20  # smaller results come from malloc's heap, mostly without faults (ResNet-50 b1: none)
RECYCLED_PER_SIZE = 8  # results of one size held at once beyond this are plain allocations, not kept
# sizes kept (the least recently asked for goes first): a forward asks for up to 16 (ResNet-50 at batch 8 while
# recording; ViT-B/16 6); a probe found 120 calls of new batch sizes pooling 678 MiB, nothing referenced
RECYCLED_SIZES = 32
RECORDING_RECYCLE_FROM_BYTES = 2**14  # while a CPU graph records: see the module docstring
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # (private; without it, results are not recycled)


def _buffers() -> dict:
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    return buffers


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``, backed by this thread's buffer for ``slot``.

    Valid until the next request for the same slot on this thread: a caller that needs two temporaries at once
    names two slots, and nothing it returns may be a view of one.
    """
    numel = math.prod(shape)
    buffers = _buffers()
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        buffers[(slot, dtype)] = buffer = None  # free the smaller one first: peak memory = the new size
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffer = buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _results() -> dict:
    results = getattr(_LOCAL, "results", None)
    if results is None:
        results = _LOCAL.results = {}
    return results


def _new_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
        return torch.empty(numel, dtype=dtype)


def _references(buffer: torch.Tensor) -> tuple[int, int]:
    """(tensors and other C++ holders of ``buffer``'s storage, Python references to its storage object): a held
    ``untyped_storage()`` is the same Python object each time, so it shows only in the second count."""
    storage = buffer.untyped_storage()  # (held while counted: it is one of the references)
    return _USE_COUNT(storage._cdata), sys.getrefcount(storage)


_FREE = _references(_new_buffer(1, torch.float32)) if _USE_COUNT else (0, 0)  # the pool's tensor alone


def _unreferenced(buffer: torch.Tensor) -> bool:
    """Whether nothing but the pool holds the buffer (a storage in shared memory, share_memory_()'s or a
    multiprocessing queue's, may be held by another process, which no count sees: never)."""
    if buffer.is_shared():
        return False
    tensors, objects = _references(buffer)
    held = getattr(_LOCAL, "recording_holds", None)  # (a recording's own aliases: see held_by_recording)
    if held:
        tensors -= held.get(buffer.untyped_storage()._cdata, 0)
    return tensors <= _FREE[0] and objects <= _FREE[1]


def give_up(storages) -> None:
    """Drop this thread's scratch buffers on ``storages`` (a recording's, which keeps them): the thread's later
    calls get buffers of their own, so that another thread may replay the recording meanwhile."""
    buffers = _buffers()
    for key in [key for key, buffer in buffers.items() if buffer.untyped_storage()._cdata in storages]:
        del buffers[key]


def users_besides(tensor: torch.Tensor, known: int) -> int | None:
    """How many tensors (and other holders) use ``tensor``'s storage besides ``known`` of them and this thread's
    pool of results; None when torch does not say (its use count is private API)."""
    if _USE_COUNT is None:
        return None
    storage = tensor.untyped_storage()  # (held while counted, as in _references: part of _FREE's count too)
    pooled = any(buffer.untyped_storage()._cdata == storage._cdata for pool in _results().values() for buffer in pool)
    return _USE_COUNT(storage._cdata) - _FREE[0] + (0 if pooled else 1) - known


@contextlib.contextmanager
def held_by_recording(holds: dict[int, int]):
    """Meanwhile, on this thread, ``holds`` (storage -> how many of a recording's own aliases use it, kept up to
    date by ``runtime.call_record``) do not count as users of a recycled result: results are recycled as in an
    eager forward, and a replay, making the same calls in the same order, reuses them the same way."""
    previous = getattr(_LOCAL, "recording_holds", None)
    _LOCAL.recording_holds = holds
    try:
        yield
    finally:
        _LOCAL.recording_holds = previous


def result(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape`` for a kernel's result, which the caller owns: from
    ``RECYCLE_FROM_BYTES`` on, the storage of an earlier result that nothing references any more, when there is
    one (no page faults: it is mapped already)."""
    numel = math.prod(shape)
    recording = getattr(_LOCAL, "recording_holds", None) is not None
    if _USE_COUNT is None or numel * dtype.itemsize < (RECORDING_RECYCLE_FROM_BYTES if recording
                                                        else RECYCLE_FROM_BYTES):
        return torch.empty(shape, dtype=dtype)
    pools = _results()  # (in the order the sizes were last asked for: the first least recently)
    pool = pools.pop((numel, dtype), None)
    pools[(numel, dtype)] = pool = [] if pool is None else pool  # (in the order handed out: the last most recently)
    while len(pools) > RECYCLED_SIZES:  # (a buffer a caller still holds lives on with its holder)
        del pools[next(iter(pools))]
    if any(buffer.is_shared() for buffer in pool):  # (sent to another process: it is theirs now)
        pool[:] = [buffer for buffer in pool if not buffer.is_shared()]
    free = next((i for i in range(len(pool) - 1, -1, -1) if _unreferenced(pool[i])), None)
    if free is not None:
        buffer = pool.pop(free)
        pool.append(buffer)
    else:
        buffer = _new_buffer(numel, dtype)
        if len(pool) < RECYCLED_PER_SIZE:
            pool.append(buffer)
    # a tensor of its own on the storage, not a view: to the caller it is a fresh tensor (no _base, and made
    # under inference mode, an inference tensor, as torch.empty's would be)
    return torch.empty(0, dtype=dtype).set_(buffer.untyped_storage(), 0, shape)


def release_scratch() -> int:
    """Free the calling thread's scratch buffers and recycled results (results still referenced stay alive with
    their holders); returns the bytes the pools held."""
    freed = scratch_bytes()
    _buffers().clear()
    _results().clear()
    return freed


def scratch_bytes() -> int:
    """Bytes held by the calling thread's scratch buffers and recycled results."""
    held = [*_buffers().values(), *(buffer for pool in _results().values() for buffer in pool)]
    return sum(buffer.numel() * buffer.element_size() for buffer in held)


def pad_images(x: torch.Tensor, pads: tuple[int, int, int, int], slot: str) -> torch.Tensor:
    """``F.pad(x, pads).contiguous()`` for images [B, C, H, W] (pads = left, right, top, bottom; zeros; negative
    amounts crop). From ``MMAPPED_BYTES`` on, written into the scratch buffer ``slot`` with only the border zeroed
    (64x64x56x56: 6.7 ms against F.pad's 26.2); below, F.pad, whose one call beats the ~12 small ops of the border
    (1x16x8x8: 6 us against 39)."""
    left, right, top, bottom = pads
    height, width = x.shape[2], x.shape[3]
    if max(-top, 0) + max(-bottom, 0) >= height or max(-left, 0) + max(-right, 0) >= width:
        return F.pad(x, pads).contiguous()  # nothing of x is left: F.pad's result, or its error
    padded = x.shape[0] * x.shape[1] * (height + top + bottom) * (width + left + right) * x.element_size()
    if padded < MMAPPED_BYTES:
        return F.pad(x, pads).contiguous()
    source = x[:, :, max(-top, 0):height - max(-bottom, 0), max(-left, 0):width - max(-right, 0)]
    top, bottom, left, right = max(top, 0), max(bottom, 0), max(left, 0), max(right, 0)
    rows, cols = source.shape[2], source.shape[3]
    out = scratch(slot, (x.shape[0], x.shape[1], rows + top + bottom, cols + left + right), x.dtype)
    out[:, :, :top].zero_()
    out[:, :, top + rows:].zero_()
    out[:, :, top:top + rows, :left].zero_()
    out[:, :, top:top + rows, left + cols:].zero_()
    out[:, :, top:top + rows, left:left + cols].copy_(source)
    return out
