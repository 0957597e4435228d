"""What settle and the batch-chunk choice promise beyond the fastest size: the calls settle reports are the
forwards it made, a gain of exactly ``MIN_GAIN`` counts (the rule is "at most"), one lucky round does not decide
(the median of the rounds does), stacks that see different batches only get chunk sizes smaller than their own
batch, and a batch ending in a partial chunk is written into an output of its own size. Each test failed on a
mutant the rest of the suite let through (mutation probe, session 44)."""

import warnings

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn import batch_chunks
from srigl_compile.nn.batch_chunks import ChunkedSequential
from srigl_compile.nn.settle import settle
from srigl_compile.zoo import ResNet

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = ResNet(num_classes=10, blocks=(1, 1), width=8).eval()
    sparse = sparsify(model, SRigLConfig(sparsity=0.8, distribution="uniform"),
                      example_inputs=(torch.randn(2, 3, 32, 32),))
    return lower(sparse, LlvmConfig(dense_fallback=False, progress=False))


def _stacks(model: nn.Module) -> list[ChunkedSequential]:
    return [m for m in model.modules() if isinstance(m, ChunkedSequential)]


def _timed(monkeypatch, seconds) -> list:
    """Whole forwards take ``seconds(size in use, how many forwards of that size were timed before)``."""
    timed = []

    def forward_seconds(model, *args):
        model(*args)
        sizes = {size for stack in _stacks(model) for size in (stack.chunk_sizes.get(stack._seen),)}
        assert len(sizes) == 1, sizes  # (every pending stack is set to the size being timed)
        size = sizes.pop()
        timed.append(size)
        return seconds(size, timed.count(size) - 1)

    monkeypatch.setattr(batch_chunks, "_forward_seconds", forward_seconds)
    return timed


def test_settle_returns_the_number_of_forwards_it_made(resnet):
    """Its docstring: "Returns the calls made". Counted here by a hook on the model itself (each call of
    ``model(x)``: the dense-form trials' of each chunk size and the timed ones alike)."""
    resnet.layers.chunk_sizes.clear()
    forwards = []
    handle = resnet.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        x = torch.randn(8, 3, 32, 32)
        calls = settle(resnet, x)
        assert calls == len(forwards) and calls > 3 * batch_chunks.ROUNDS  # (3 sizes timed: None, 4, 2)
        assert resnet.layers.chunk_sizes.keys() == {torch.Size([8, 8, 8, 8])}
        forwards.clear()
        assert settle(resnet, x) == len(forwards) == 1
    finally:
        handle.remove()


@pytest.mark.parametrize("share, chosen", [(1.0, 4), (1.0 + 1e-6, None)])
def test_a_chunk_size_taking_exactly_min_gain_of_the_whole_batch_is_kept(resnet, monkeypatch, share, chosen):
    """Chunks are kept when a forward takes *at most* MIN_GAIN of the whole batch's time."""
    resnet.layers.chunk_sizes.clear()
    whole = 2.0
    chunked = {None: whole, 4: batch_chunks.MIN_GAIN * whole * share, 2: whole}
    _timed(monkeypatch, lambda size, _: chunked[size])
    settle(resnet, torch.randn(8, 3, 32, 32))
    assert resnet.layers.chunk_sizes == {torch.Size([8, 8, 8, 8]): chosen}


def test_one_fast_round_does_not_decide_the_median_does(resnet, monkeypatch):
    """Chunks of 4 timed 0.5 s once and 1.2 s twice (median 1.2 s) against whole batches at 1.0 s: a timing
    outlier must not choose the chunk size, whole batches stay."""
    resnet.layers.chunk_sizes.clear()
    monkeypatch.setattr(batch_chunks, "ROUNDS", 3)
    rounds = {None: [1.0, 1.0, 1.0], 4: [0.5, 1.2, 1.2], 2: [1.1, 1.1, 1.1]}
    timed = _timed(monkeypatch, lambda size, i: rounds[size][i])
    settle(resnet, torch.randn(8, 3, 32, 32))
    assert timed == [None, 4, 2] * 3
    assert resnet.layers.chunk_sizes == {torch.Size([8, 8, 8, 8]): None}
    resnet.layers.chunk_sizes.clear()
    timed.clear()
    rounds[4] = [1.2, 0.5, 0.5]  # (the median is the fast one now: kept)
    settle(resnet, torch.randn(8, 3, 32, 32))
    assert resnet.layers.chunk_sizes == {torch.Size([8, 8, 8, 8]): 4}


class _TwoBatches(nn.Module):
    """Two stacks of convolutions: one sees the batch, the other twice as many images."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        doubled = self.b(torch.cat([x, x]))
        return self.a(x) + doubled[:x.shape[0]] + doubled[x.shape[0]:]


def test_stacks_seeing_different_batches_only_get_chunks_smaller_than_their_own_batch(monkeypatch):
    """Sizes are tried that divide the smallest batch pending; a size as large as a stack's whole batch (here 4
    for stack ``a`` at batch 4, when stack ``b`` sees 8) is no chunk of it."""
    torch.manual_seed(0)
    masked = sparsify(_TwoBatches(), SRigLConfig(sparsity=0.5, distribution="uniform"),
                      example_inputs=(torch.randn(2, 4, 6, 6),)).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False))
    assert [type(lowered.a), type(lowered.b)] == [ChunkedSequential] * 2
    timed = _timed(monkeypatch, lambda size, _: {None: 1.0, 8: 0.4, 4: 0.5, 2: 0.9}[size])
    x = torch.randn(4, 4, 6, 6)
    settle(lowered, x)
    assert set(timed) == {None, 2}
    assert lowered.a.chunk_sizes == {torch.Size([4, 4, 6, 6]): 2}
    assert lowered.b.chunk_sizes == {torch.Size([8, 4, 6, 6]): 2}
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)


def test_a_batch_ending_in_a_partial_chunk_is_written_into_an_output_of_its_size(resnet):
    """6 images in chunks of 4: the output is allocated for 6 images (one sized for 4 + 4 would be resized by
    torch.cat, with a warning, after the allocation it wasted)."""
    resnet.layers.chunk_sizes.clear()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        whole = resnet(x)
        resnet.layers.chunk_sizes[resnet.layers._seen] = 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            chunked = resnet(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
