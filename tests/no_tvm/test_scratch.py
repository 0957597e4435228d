"""Scratch buffers: reuse, growth, per-thread isolation; recycled results: reused only once nothing holds them, the
size asked for least recently forgotten first, the free buffer handed out last handed out first, never a buffer a
tensor still holds while a recording's holds are counted; and pad_images == F.pad (pure torch, no TVM)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile.runtime import scratch as scratch_module
from srigl_compile.runtime.scratch import (
    held_by_recording,
    pad_images,
    release_scratch,
    result,
    scratch,
    scratch_bytes,
    users_besides,
)


def test_a_slot_is_reused_grown_and_released():
    release_scratch()
    first = scratch("a", (4, 8))
    again = scratch("a", (2, 3))
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 3) and again.is_contiguous()
    other = scratch("b", (4, 8))
    assert other.data_ptr() != first.data_ptr()  # two slots can be used at once
    bigger = scratch("a", (100, 100))
    assert bigger.shape == (100, 100) and scratch_bytes() == (100 * 100 + 32) * 4
    assert scratch("a", (5,), torch.int64).dtype == torch.int64  # one buffer per dtype
    assert release_scratch() == (100 * 100 + 32) * 4 + 5 * 8 and scratch_bytes() == 0


def test_threads_get_their_own_buffers():
    release_scratch()
    mine = scratch("a", (16,))
    seen = {}

    def worker():
        seen["ptr"] = scratch("a", (16,)).data_ptr()
        seen["bytes"] = scratch_bytes()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["ptr"] != mine.data_ptr() and seen["bytes"] == 16 * 4
    assert scratch_bytes() == 16 * 4  # the worker's buffer is not this thread's
    release_scratch()


@pytest.fixture
def recycle_all(monkeypatch):
    """Recycle results of every size (the default threshold is 1 MiB); fresh pools before and after."""
    monkeypatch.setattr(scratch_module, "RECYCLE_FROM_BYTES", 0)
    release_scratch()
    yield
    release_scratch()


def test_a_result_is_recycled_only_once_nothing_references_it(recycle_all):
    first = result((4, 8))
    ptr = first.data_ptr()
    second = result((4, 8))
    assert second.data_ptr() != ptr  # first is still held
    del first
    third = result((2, 16))  # any shape of the same size and dtype
    assert third.data_ptr() == ptr and third.shape == (2, 16) and third.is_contiguous()
    assert result((32,), torch.int32).data_ptr() not in (ptr, second.data_ptr())  # one pool per dtype
    assert scratch_bytes() == 2 * 32 * 4 + 32 * 4


@pytest.mark.parametrize("holder", [lambda t: t[1:], lambda t: t.view(-1), lambda t: t.numpy(),
                                    lambda t: t.untyped_storage(), lambda t: torch.utils.dlpack.to_dlpack(t)])
def test_views_arrays_and_storages_keep_a_result_from_being_recycled(recycle_all, holder):
    first = result((4, 8))
    first.fill_(1.0)
    kept = holder(first)
    ptr = first.data_ptr()
    del first
    again = result((4, 8))
    assert again.data_ptr() != ptr
    again.fill_(2.0)  # must not write into what ``kept`` still sees
    del kept
    assert result((4, 8)).data_ptr() == ptr


def test_a_result_moved_to_shared_memory_is_never_recycled(recycle_all):
    """A result sent through a multiprocessing queue (share_memory_()) was overwritten by the next forward in the
    other process too (a probe: 8.5 off); the pool forgets it."""
    first = result((4, 8))
    first.fill_(1.0)
    first.share_memory_()
    ptr, before = first.data_ptr(), scratch_bytes()
    del first  # (the other process still maps it)
    again = result((4, 8))
    assert again.data_ptr() != ptr and scratch_bytes() == before  # (a new buffer in the shared one's place)


def test_results_below_the_threshold_are_plain_allocations():
    release_scratch()
    small = result((4, 8))
    assert scratch_bytes() == 0 and small.shape == (4, 8)


def test_of_the_free_results_the_one_handed_out_last_is_recycled(recycle_all):
    first, second, third = result((8,)), result((8,)), result((8,))
    ptrs = [t.data_ptr() for t in (first, second, third)]
    del first, third
    again = result((8,))  # third was handed out after first: likelier in cache
    assert again.data_ptr() == ptrs[2]
    del second
    assert result((8,)).data_ptr() == ptrs[1]  # now the most recently handed out free one
    assert len({*ptrs}) == 3 and scratch_bytes() == 3 * 8 * 4


def test_while_recording_smaller_results_are_recycled_too():
    release_scratch()
    size = scratch_module.RECORDING_RECYCLE_FROM_BYTES // 4  # floats: above the recording threshold only
    assert size * 4 < scratch_module.RECYCLE_FROM_BYTES
    eager = result((size,))
    assert scratch_bytes() == 0  # a plain allocation outside a recording
    with held_by_recording({}):
        first = result((size,))
        ptr = first.data_ptr()
        assert scratch_bytes() == size * 4
        del first
        assert result((size,)).data_ptr() == ptr
        small = result((size // 2,))  # below the recording threshold: plain
        assert scratch_bytes() == size * 4 and small.numel() == size // 2
    assert eager.numel() == size
    release_scratch()


def test_at_most_recycled_per_size_results_are_kept(recycle_all):
    held = [result((16,)) for _ in range(scratch_module.RECYCLED_PER_SIZE + 3)]
    assert len({t.data_ptr() for t in held}) == len(held)
    assert scratch_bytes() == scratch_module.RECYCLED_PER_SIZE * 16 * 4
    del held
    assert release_scratch() == scratch_module.RECYCLED_PER_SIZE * 16 * 4 and scratch_bytes() == 0


def test_the_pool_keeps_the_sizes_asked_for_most_recently(recycle_all):
    """A probe found inputs of ever new shapes growing the pool without end (120 batch sizes: 678 MiB kept)."""
    sizes = scratch_module.RECYCLED_SIZES
    first = result((1000,))
    kept = first.data_ptr()
    del first
    for n in range(1, sizes):  # (sizes - 1 others: the first is still among the most recent)
        result((n,))
    again = result((1000,))  # (asked for again: the most recent now)
    assert again.data_ptr() == kept
    del again
    for n in range(sizes, 3 * sizes):
        result((n,))
    assert scratch_bytes() == 4 * sum(range(2 * sizes, 3 * sizes))  # (the last `sizes` sizes, one buffer each)


def test_a_result_taken_in_inference_mode_is_writable_outside_it(recycle_all):
    with torch.inference_mode():
        inside = result((8,))
        assert inside.is_inference() and inside._base is None  # as torch.empty's would be
        inside.fill_(1.0)
        ptr = inside.data_ptr()
        del inside
    outside = result((8,))
    assert outside.data_ptr() == ptr and not outside.is_inference() and outside._base is None
    outside.add_(1.0)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 3), height=st.integers(1, 7), width=st.integers(1, 7),
       pads=st.tuples(*[st.integers(-3, 3)] * 4), channels_last=st.booleans())
def test_pad_images_equals_f_pad(batch, channels, height, width, pads, channels_last):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scratch_module, "MMAPPED_BYTES", 0)  # the scratch path at any size (below it: F.pad)
        _check_pad_images(batch, channels, height, width, pads, channels_last)


def _check_pad_images(batch, channels, height, width, pads, channels_last):
    x = torch.randn(batch, channels, height, width)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scratch("padded", (batch, channels, height + 6, width + 6)).fill_(float("nan"))  # stale data must not leak
    try:
        expected = F.pad(x, pads)
    except RuntimeError as err:  # a crop past the image: the same error
        with pytest.raises(RuntimeError, match=str(err).split(":")[0]):
            pad_images(x, pads, "padded")
        return
    out = pad_images(x, pads, "padded")
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_pad_images_uses_f_pad_below_the_mmap_threshold():
    x = torch.randn(1, 2, 5, 5)
    before = scratch_bytes()
    torch.testing.assert_close(pad_images(x, (1, 1, 1, 2), "small"), F.pad(x, (1, 1, 1, 2)), rtol=0, atol=0)
    assert scratch_bytes() == before


def test_a_size_asked_for_again_outlives_sizes_asked_for_since(recycle_all):
    """Mutant: a size asked for again kept its place (first in, first out), so the next new size evicted it."""
    sizes = scratch_module.RECYCLED_SIZES
    result((1000,))  # (dropped at once: free in the pool)
    for n in range(1, sizes):  # the pool now holds `sizes` sizes, 1000 the least recently asked for
        result((n,))
    result((1000,))  # asked for again: now the most recent; 1 is the least recent
    newest = 5000
    result((newest,))  # one size too many: evicts 1, not 1000
    assert scratch_bytes() == 4 * (1000 + sum(range(2, sizes)) + newest)


def test_of_the_free_results_the_one_handed_out_most_recently_goes_first(recycle_all):
    """Mutant: a recycled buffer kept its old place in its pool, so a later request took a colder one."""
    held = [result((64,)) for _ in range(3)]
    ptrs = [t.data_ptr() for t in held]
    del held  # all three free; the last made is the last handed out
    x = result((64,))
    y = result((64,))  # handed out after x
    assert (x.data_ptr(), y.data_ptr()) == (ptrs[2], ptrs[1])
    del x, y
    assert result((64,)).data_ptr() == ptrs[1]  # y's: handed out last


def test_while_recording_a_result_a_tensor_holds_is_never_handed_out_again(recycle_all):
    """Mutant: with a recording's holds in force, a storage the recording does not hold was discounted one user,
    so a result the caller still held was handed out again (two results on one buffer)."""
    size = scratch_module.RECORDING_RECYCLE_FROM_BYTES // 4
    with held_by_recording({-1: 1}):  # (holds of some other storage: the mapping is not empty)
        first = result((size,))
        first.fill_(1.0)
        second = result((size,))
        second.fill_(2.0)
        assert second.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        torch.testing.assert_close(first, torch.ones(size), rtol=0, atol=0)
        del first
        third = result((size,))  # the first's buffer, free now, is recycled
        third.fill_(3.0)
        torch.testing.assert_close(second, torch.full((size,), 2.0), rtol=0, atol=0)


@pytest.mark.parametrize("pooled", [True, False], ids=["recycled", "plain"])
def test_users_besides_counts_the_views_of_a_result(recycle_all, pooled):
    """Mutant: the pool's own reference was discounted for tensors outside the pool and not for pooled ones."""
    tensor = result((4, 8)) if pooled else torch.empty(4, 8)
    assert users_besides(tensor, 1) == 0  # the tensor itself is the one known user
    views = [tensor[1:], tensor.view(-1)]
    assert users_besides(tensor, 1) == 2
    del views
    assert users_besides(tensor, 1) == 0
