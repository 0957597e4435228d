"""The passes after CompileKernelsPass on small models, each against the masked model's own outputs: a convolution
called twice never fused with a max-pool (FuseConvPoolPass), and a pool registered under two names lowered under both
(LowerMaxPoolPass)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.nn.pooling import LoweredMaxPool2d

pytestmark = pytest.mark.tvm

CONFIG = LlvmConfig(dense_fallback=False, progress=False)  # (kernels only: a small layer may choose its dense form)


def _lowered(net: nn.Module, shape):
    torch.manual_seed(0)
    masked = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    return masked, lower(masked, CONFIG, example_inputs=(torch.randn(1, *shape[1:]),))


def _assert_same(lowered, masked, shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = lowered(x), masked(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return got


class _ConvCalledTwice(nn.Module):
    """One convolution called twice: once read by a max-pool alone, once on a downsampled input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.pool, self.down = nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x)) + self.conv(self.down(x))


def test_a_convolution_called_twice_is_not_fused_with_one_call_s_max_pool():
    """Mutant: FuseConvPoolPass fused a conv called twice; its other call then handed its input on unchanged."""
    masked, lowered = _lowered(_ConvCalledTwice(), (2, 8, 12, 12))
    assert isinstance(lowered.conv, LoweredConv)
    _assert_same(lowered, masked, (2, 8, 12, 12))


class _AliasedPool(nn.Module):
    """One max-pool module under two names (``alias`` is the same object)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.pool, self.conv = nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.pool

    def forward(self, x):
        return self.conv(self.pool(x))


def test_a_pool_registered_under_two_names_is_lowered_under_both():
    """Mutant: named_modules() without duplicates: only the first name's pool became the lowered class."""
    masked, lowered = _lowered(_AliasedPool(), (2, 8, 8, 8))
    assert type(lowered.pool) is LoweredMaxPool2d and type(lowered.alias) is LoweredMaxPool2d
    _assert_same(lowered, masked, (2, 8, 8, 8))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered.alias(x), nn.functional.max_pool2d(x, 2), rtol=0, atol=0)
