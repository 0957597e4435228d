"""Recycled results (runtime.scratch): the pool forgets the size asked for least recently, hands out the free buffer
it handed out last, never hands out a buffer a tensor still holds while a recording's holds are counted, and says
how many users a tensor has besides its known ones (pure torch, no TVM)."""

import pytest
import torch

from srigl_compile.runtime import scratch as scratch_module
from srigl_compile.runtime.scratch import held_by_recording, release_scratch, result, scratch_bytes, users_besides

pytestmark = pytest.mark.skipif(scratch_module._USE_COUNT is None, reason="torch does not expose storage use counts")


@pytest.fixture
def recycle_all(monkeypatch):
    """Recycle results of every size; fresh pools before and after."""
    monkeypatch.setattr(scratch_module, "RECYCLE_FROM_BYTES", 0)
    release_scratch()
    yield
    release_scratch()


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
