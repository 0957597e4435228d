"""Per-sample stacks of lowered convolutions may run a batch in chunks (``nn.batch_chunks``): only stacks that
provably compute each image alone become chunked, chunked outputs are the whole batch's bit for bit, settle keeps
the chunk size whole forwards measured fastest (and only a real gain), and the choice is this machine's."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn import batch_chunks, dense_fallback
from srigl_compile.nn.batch_chunks import ChunkedSequential, per_sample
from srigl_compile.nn.settle import settle
from srigl_compile.zoo import ResNet

pytestmark = pytest.mark.tvm


class _BatchCentred(nn.Module):
    """Mixes the images of a batch: what must never run in chunks."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def _lowered(mixing: bool = False, dense_forms: bool = True) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = ResNet(num_classes=10, blocks=(1, 1), width=8).eval()
    if mixing:
        model.layers.insert(1, _BatchCentred())
    sparse = sparsify(model, SRigLConfig(sparsity=0.8, distribution="uniform"),
                      example_inputs=(torch.randn(2, 3, 32, 32),))
    return sparse, lower(sparse, LlvmConfig(dense_fallback=dense_forms, progress=False))


def test_only_per_sample_stacks_of_convolutions_are_chunked():
    _, lowered = _lowered()
    assert type(lowered.layers) is ChunkedSequential and lowered.layers.chunk_sizes == {}
    assert [type(m) for m in lowered.modules()].count(ChunkedSequential) == 1  # (the outermost stack only)
    _, mixing = _lowered(mixing=True)
    assert type(mixing.layers) is nn.Sequential, "a stack with a batch-mixing step must run whole batches"
    assert not per_sample(fx.symbolic_trace(_BatchCentred()))
    viewing = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Flatten(0)))  # (a view across the batch)
    assert not per_sample(viewing)
    assert per_sample(lowered.layers[0]) and per_sample(nn.Sequential(nn.ReLU(), nn.Identity()))
    assert type(lowered.maxpool).__name__ == "LoweredConvMaxPool" and per_sample(nn.Sequential(lowered.maxpool))


@pytest.mark.parametrize("size", [2, 4])
def test_chunked_outputs_are_the_whole_batch_s_bit_for_bit(size):
    sparse, lowered = _lowered(dense_forms=False)  # (each chunk shape has a dense-form trial of its own)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        whole = lowered(x)
        lowered.layers.chunk_sizes[lowered.layers._seen] = size  # (4: a chunk of 4 and one of 2)
        batches = []
        hook = lowered.layers[0].conv1.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        chunked = lowered(x)
        hook.remove()
        assert batches == [size] * (6 // size) + ([6 % size] if 6 % size else [])
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
        torch.testing.assert_close(chunked, sparse(x), rtol=1e-4, atol=1e-4)
        traced = fx.symbolic_trace(lowered)  # (traced calls run whole batches)
        torch.testing.assert_close(traced(x), whole, rtol=0, atol=0)


def _timed_by_chunk(monkeypatch, lowered, seconds: dict) -> list:
    """Whole forwards take ``seconds[chunk size in use]``; returns the list of sizes timed, as they are."""
    timed = []

    def forward_seconds(model, x):
        model(x)
        timed.append(model.layers.chunk_sizes[model.layers._seen])
        return seconds[timed[-1]]
    monkeypatch.setattr(batch_chunks, "_forward_seconds", forward_seconds)
    return timed


@pytest.mark.parametrize("seconds, chosen", [({None: 1.0, 4: 0.90, 2: 0.95}, 4),
                                             ({None: 1.0, 4: 0.98, 2: 0.99}, None)])  # (under 3%: whole batches)
def test_settle_keeps_the_fastest_chunk_size_that_gains(monkeypatch, seconds, chosen):
    _, lowered = _lowered()
    timed = _timed_by_chunk(monkeypatch, lowered, seconds)
    x = torch.randn(8, 3, 32, 32)  # (8 itself is no chunk: 4 and 2 are tried)
    calls = settle(lowered, x)
    assert lowered.layers.chunk_sizes == {torch.Size([8, 8, 8, 8]): chosen}
    assert timed == [None, 4, 2] * batch_chunks.ROUNDS  # alternating, each size's trials settled before
    assert calls > len(timed)
    assert settle(lowered, x) == 1  # (decided)
    settle(lowered, x[:1])  # one image: nothing to chunk, nothing timed
    assert lowered.layers.chunk_sizes[torch.Size([1, 8, 8, 8])] is None and len(timed) == 3 * batch_chunks.ROUNDS


def test_chunk_choices_are_kept_on_this_machine_only(monkeypatch, tmp_path):
    _, lowered = _lowered()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        lowered(x)
        lowered.layers.chunk_sizes[lowered.layers._seen] = 2
        want = lowered(x)
        save_lowered(lowered, tmp_path / "model")
        again = load_lowered(tmp_path / "model")
        assert again.layers.chunk_sizes == {torch.Size([4, 8, 8, 8]): 2}
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
        monkeypatch.setattr(dense_fallback, "machine", lambda: ("another", "cpu"))
        elsewhere = load_lowered(tmp_path / "model")
    assert type(elsewhere.layers) is ChunkedSequential and elsewhere.layers.chunk_sizes == {}


def test_an_unbatched_image_runs_whole_and_settles():
    """A stack given one [C, H, W] image split its channels as if they were images (a probe found cpu_graph and
    settle failing with a channel-count error on an input eager calls took)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    sparse = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    lowered = lower(sparse, LlvmConfig(progress=False))
    assert type(lowered) is ChunkedSequential
    x = torch.randn(16, 9, 9)
    with torch.no_grad():
        want = sparse(x)
        settle(lowered, x)
        assert lowered._seen is None and lowered.chunk_sizes == {}
        torch.testing.assert_close(lowered(x), want, rtol=1e-5, atol=1e-5)
