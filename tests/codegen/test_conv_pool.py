"""A direct convolution and the max-pool that alone reads it, run band by band (``nn.conv_pool``,
``passes/fuse_conv_pool.py``, ``runtime.conv_pool_op``): the bands' geometry against torch's pooling, the fused
module bit-equal to the two layers run one after the other and close to the masked model, which pairs fuse, and
the paths that run unfused."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import SRigLConfig, cpu_graph, load_lowered, lower, save_lowered, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.errors import InferenceOnlyError
from srigl_compile.nn.conv_pool import FusedConvPlace, LoweredConvMaxPool
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.runtime import conv_pool_op
from srigl_compile.runtime.checks import KernelDtypeError
from srigl_compile.runtime.conv_geometry import pool_bands


@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 40), kernel=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       rows=st.integers(1, 9), data=st.data())
def test_pooling_each_band_on_its_own_gives_the_pooling_of_the_whole(height, kernel, stride, dilation, rows, data):
    padding = data.draw(st.integers(0, kernel // 2))  # (torch: padding <= kernel / 2)
    if height + 2 * padding < dilation * (kernel - 1) + 1:
        with pytest.raises(ValueError):
            pool_bands(height, kernel, stride, padding, dilation, rows)
        return
    x = torch.randn(1, 1, height, 1)
    whole = F.max_pool2d(x, (kernel, 1), (stride, 1), (padding, 0), (dilation, 1))[0, 0, :, 0]
    bands = pool_bands(height, kernel, stride, padding, dilation, rows)
    assert [b.first for b in bands] == list(range(0, whole.numel(), rows)) and bands[-1].end == whole.numel()
    for band in bands:
        assert 0 <= band.in_first < band.in_end <= height and 0 <= band.pad_top <= padding
        part = x[..., band.in_first:band.in_end, :]  # padded as the kernel reads it: -inf above and below
        part = F.pad(part, (0, 0, band.pad_top, dilation * kernel + stride * rows), value=float("-inf"))
        pooled = F.max_pool2d(part, (kernel, 1), (stride, 1), 0, (dilation, 1))[0, 0, :band.end - band.first, 0]
        assert torch.equal(pooled, whole[band.first:band.end])


class Stem(nn.Module):
    """A ResNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and a second pair (3x3 conv, 2x2 pool), each conv read
    by its pool alone; then a convolution whose output a pool and a residual add read (not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.pool2 = nn.Conv2d(16, 24, 3, padding=2, dilation=2), nn.MaxPool2d(2)
        self.conv3, self.pool3 = nn.Conv2d(24, 24, 3, padding=1), nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        h = self.pool2(self.conv2(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        h = self.conv3(h)
        return self.pool3(h) + h


@pytest.fixture(scope="module")
def stem():
    torch.manual_seed(0)
    model = Stem()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    masked = sparsify(model, SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    # no dense forms: the tests compare the fused bands with the unfused kernels bit for bit, and a timing trial
    # may hand the unfused conv to torch's dense convolution (another summation order; it did, in CI, under load)
    config = LlvmConfig(dense_fallback=False, progress=False)
    return masked, lower(masked, config, example_inputs=(torch.randn(1, 3, 40, 40),))


@pytest.fixture(scope="module")
def stem_with_dense_forms(stem):
    """The stem lowered as ``lower`` does by default: near-dense layers get a dense form."""
    masked, _ = stem
    return lower(masked, example_inputs=(torch.randn(1, 3, 40, 40),), progress=False)


def unfused(fused: LoweredConvMaxPool, x: torch.Tensor) -> torch.Tensor:
    """The two layers one after the other, as before the fusion."""
    return fused.pool(fused.conv(x))


@pytest.mark.tvm
def test_pairs_whose_conv_only_a_max_pool_reads_are_fused_and_the_rest_left(stem):
    _, lowered = stem
    assert isinstance(lowered.maxpool, LoweredConvMaxPool) and isinstance(lowered.pool2, LoweredConvMaxPool)
    assert type(lowered.conv1) is FusedConvPlace and type(lowered.conv2) is FusedConvPlace
    assert isinstance(lowered.conv3, LoweredConv), "its output is also added: not fused"
    assert lowered.maxpool.conv.epilogue == "relu" and lowered.maxpool.conv.fused_epilogue
    assert type(lowered.conv1) is FusedConvPlace and lowered.conv1.out_channels == 16, "reads the fused conv's"
    assert not any(name.startswith("conv1.") for name in lowered.state_dict()), "the conv's tensors are kept once"


class ReadsItsConv(nn.Module):
    """A forward that reads its convolution's attributes, which a traced graph does not show."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3, 1, 1), nn.MaxPool2d(2), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).reshape(-1, self.conv.out_channels * 16))


@pytest.mark.tvm
def test_a_forward_reading_the_fused_conv_s_attributes_keeps_working():
    torch.manual_seed(1)
    masked = sparsify(ReadsItsConv(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)
    assert isinstance(lowered.pool, LoweredConvMaxPool)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
@pytest.mark.parametrize("settings", [dict(padding=-1), dict(dilation=0), dict(stride=0), dict(kernel_size=0)])
def test_max_pool_settings_torch_refuses_raise_torch_s_error(stem, settings):
    """Settings nn.MaxPool2d accepts and F.max_pool2d refuses: the lowered pools raise torch's error, as the
    masked model does, instead of computing something."""
    _, lowered = stem
    fused = lowered.maxpool
    bad = nn.MaxPool2d(**{**dict(kernel_size=3, stride=2, padding=1), **settings})
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as expected:
            bad(fused.conv(x))
        for pool in (type(fused.pool)(bad, fused.pool.kernel_key), LoweredConvMaxPool(
                fused.conv, type(fused.pool)(bad, fused.pool.kernel_key))):
            with pytest.raises(RuntimeError, match=re.escape(str(expected.value).split("\n")[0][:40])):
                pool(fused.conv(x) if isinstance(pool, type(fused.pool)) else x)


@pytest.mark.tvm
@pytest.mark.parametrize("band_bytes", [1, 4096, 2**20])  # a band per pool row, a few bands, one band
def test_the_bands_equal_the_layers_run_one_after_the_other(stem, monkeypatch, band_bytes):
    masked, lowered = stem
    monkeypatch.setattr(conv_pool_op, "BAND_BYTES", band_bytes)
    for shape in ((1, 3, 40, 40), (3, 3, 33, 21), (2, 3, 9, 14)):
        x = torch.randn(shape)
        with torch.no_grad():
            stem_out = lowered.maxpool(x)
            assert torch.equal(stem_out, unfused(lowered.maxpool, x)), shape
            assert torch.equal(lowered.pool2(stem_out), unfused(lowered.pool2, stem_out)), shape
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
def test_calls_the_bands_do_not_take_run_the_layers(stem):
    _, lowered = stem
    fused = lowered.maxpool
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = unfused(fused, x)
        assert torch.equal(fused(x[0]), expected[0]), "unbatched images, as nn.Conv2d takes them"
    with pytest.raises(KernelDtypeError, match="float32"):  # (the layer's own typed error)
        fused(x.double())
    too_small = torch.randn(1, 3, 3, 3)  # a 2 x 2 stem output: the pool's 3 x 3 window with padding 1 fits, ...
    with torch.no_grad():
        assert torch.equal(fused(too_small), unfused(fused, too_small))
        wide = LoweredConvMaxPool(fused.conv, type(fused.pool)(nn.MaxPool2d(3, 2, 2), fused.pool.kernel_key))
        with pytest.raises(RuntimeError, match="pad should be at most half"):  # (... padding 2: torch's error)
            wide(x)
    with pytest.raises(InferenceOnlyError, match="autograd tracks its input"):
        fused(x.clone().requires_grad_())
    fused.conv.values.requires_grad_()  # (the convolution's own operand: no gradient would reach it)
    with pytest.raises(InferenceOnlyError, match="autograd tracks its values"):
        fused(x)
    fused.conv.values.requires_grad_(False)
    program = torch.export.export(lowered, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("tvm_condensed_conv2d" in t for t in targets) and any("tvm_max_pool2d" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), lowered(x), rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_a_shape_whose_dense_form_is_on_trial_or_chosen_runs_the_layers(stem_with_dense_forms, monkeypatch):
    fused = stem_with_dense_forms.maxpool
    form = fused.conv.__dict__.get("_dense_form")
    assert form is not None, "lower() gives a near-dense stem a dense form (its trial picks per shape)"
    x = torch.randn(1, 3, 40, 40)
    calls = []
    original = type(fused.conv).forward
    monkeypatch.setattr(type(fused.conv), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with torch.no_grad():
        expected = unfused(fused, x)  # (a trial call, through the layer)
        for dense, through_layer in ((None, True), (False, False), (True, True)):
            monkeypatch.setitem(form.choices, (x.shape, None), dense)
            calls.clear()
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
            assert bool(calls) == through_layer, dense


@pytest.mark.tvm
def test_fused_pairs_save_load_and_replay(stem, tmp_path):
    masked, lowered = stem
    save_lowered(lowered, tmp_path / "model")
    loaded = load_lowered(tmp_path / "model")
    assert isinstance(loaded.maxpool, LoweredConvMaxPool)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = lowered(x)
        assert torch.equal(loaded(x), expected)
        graph = cpu_graph(lowered)
        graph(x)
        assert torch.equal(graph(x), expected)


@pytest.mark.tvm
def test_traced_calls_run_the_bands_as_one_operator(stem):
    """Export and inductor keep each fused pair as ``tvm_conv_max_pool``: the same bands, bit for bit."""
    _, lowered = stem
    x = torch.randn(2, 3, 33, 21)
    with torch.no_grad():
        want = lowered(x)
        program = torch.export.export(lowered, (x,))
        targets = [str(node.target) for node in program.graph.nodes]
        assert sum("tvm_conv_max_pool" in t for t in targets) == 2, "the stem and the second pair"
        assert torch.equal(program.module()(x), want)
        assert torch.equal(torch.compile(lowered)(x), want)
    fused = lowered.maxpool
    conv, pool = fused.conv, fused.pool
    torch.library.opcheck(torch.ops.srigl_compile.tvm_conv_max_pool.default, (
        x, conv.values, conv.indices, conv.bias, conv.kernel_key, list(conv.kernel_size), list(conv.padding),
        list(conv.dilation), list(conv.stride), [pool.kernel_size] * 2, [pool.stride] * 2, [pool.padding] * 2,
        [pool.dilation] * 2))
