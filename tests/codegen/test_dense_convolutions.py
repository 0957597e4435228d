"""Dense convolutions of a sparse model lowered as layers of full fan-in (``passes/dense_convolutions.py``): they
compute what the dense layer did, fold their BatchNorm and fuse their ReLU like the sparse ones, and keep a dense
form (so they run whichever path is faster); without dense forms, or where no dense form fits, they stay torch's."""

import copy

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.nn.condensed import CondensedConv
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.nn.settle import settle
from srigl_compile.passes.dense_convolutions import DenseConvolutionsPass, full_fan_in
from srigl_compile.runtime.registry import get_handle


def test_a_full_fan_in_layer_computes_the_dense_convolution():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, (1, 3), stride=2, dilation=(1, 2), bias=False),
                 nn.Conv2d(6, 5, 3, padding="same")):
        layer = full_fan_in(conv)
        assert layer.k == layer.fan_in == 6 * conv.kernel_size[0] * conv.kernel_size[1] and layer.n_active == 5
        x = torch.randn(2, 6, 9, 8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 1)
        self.other = self.shared  # one module under two names
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.reflect(self.grouped(self.other(self.shared(x))))


def test_the_pass_converts_one_group_zero_padded_convolutions_and_keeps_a_shared_one_shared():
    model = _Twice()
    reference = copy.deepcopy(model)
    result = DenseConvolutionsPass()(model)
    assert result.modified
    converted = result.module
    assert isinstance(converted.shared, CondensedConv) and converted.other is converted.shared
    assert type(converted.grouped) is nn.Conv2d and type(converted.reflect) is nn.Conv2d, "no dense form fits them"
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)


class _Standardised(nn.Module):
    """A weight-standardised stem (BiT, NFNets): the forward computes with the dense weight itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.plain = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        weight = self.stem.weight
        weight = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self.plain(torch.nn.functional.conv2d(x, weight, self.stem.bias, padding=1))


def test_a_convolution_whose_weight_the_forward_reads_stays_torch_s():
    """A probe found it converted, and every call of the lowered model failing (a condensed layer keeps no dense
    weight)."""
    model = _Standardised()
    reference = copy.deepcopy(model)
    converted = DenseConvolutionsPass()(model).module
    assert type(converted.stem) is nn.Conv2d and isinstance(converted.plain, CondensedConv)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)


def _stem_kept_dense():
    """A first convolution kept dense (with a BatchNorm and ReLU after it), then sparse ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    masked = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform", keep_first_dense=True)).eval()
    assert type(masked[0]) is nn.Conv2d
    return masked


@pytest.mark.tvm
def test_lower_compiles_a_dense_convolution_with_its_batchnorm_and_relu_and_a_dense_form(tmp_path):
    masked = _stem_kept_dense()
    lowered = lower(masked, progress=False)
    stem = lowered[0]
    assert isinstance(stem, LoweredConv) and stem.epilogue == "relu"
    spec = get_handle(stem.kernel_key).spec
    assert spec.k == spec.n_in == stem.fan_in == 27, "every column of the 3x3x3 filters"
    assert isinstance(lowered[1], nn.Identity) and isinstance(lowered[2], nn.Identity), "folded, fused"
    assert "_dense_form" in stem.__dict__
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = masked(x)
        assert settle(lowered, x) > 1, "the stem's shape went on trial"
        for _ in range(2):  # (after the trial: whichever path it chose)
            torch.testing.assert_close(lowered(x), want, rtol=1e-4, atol=1e-4)
    save_lowered(lowered, tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(load_lowered(tmp_path / "model")(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
def test_without_dense_forms_a_dense_convolution_stays_torch_s():
    masked = _stem_kept_dense()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False))
    assert type(lowered[0]) is nn.Conv2d and isinstance(lowered[3], LoweredConv)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
