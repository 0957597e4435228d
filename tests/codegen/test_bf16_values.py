"""llvm kernels with bfloat16 condensed values: float32 inputs, outputs and sums, each value widened as read."""

import copy

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparse_layers, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.errors import LoweringError
from srigl_compile.runtime.checks import KernelDtypeError

pytestmark = pytest.mark.tvm

BF16 = LlvmConfig(value_dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="module")
def masked():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64), nn.Unflatten(1, (4, 4, 4)),
                        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1),
                        nn.Conv2d(8, 8, 1))
    return sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()


def _weights_rounded_to_bf16(model):
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in sparse_layers(rounded):
            layer.weight.copy_(layer.weight.to(torch.bfloat16).float())
    return rounded


def test_bf16_kernels_equal_the_model_with_its_weights_rounded_to_bf16(masked):
    lowered = lower(masked, BF16)
    keyed = [m for m in lowered.modules() if hasattr(m, "kernel_key")]
    assert keyed and all(m.values.dtype == torch.bfloat16 and "_bfloat16@" in m.kernel_key for m in keyed)
    reference = _weights_rounded_to_bf16(masked)
    for rows in (1, 2, 5, 64, 300):  # row, mid, col and fused-pack kernels; the convolutions at every batch
        x = torch.randn(rows, 96)
        with torch.no_grad():
            got, want, exact = lowered(x), reference(x), masked(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        error = float((got - exact).abs().max() / exact.abs().max())
        assert 0 < error < 1e-2, "bfloat16 values: about 8 bits of mantissa"


def test_float32_and_bf16_kernels_of_one_shape_live_side_by_side_and_reload(masked, tmp_path):
    bf16, f32 = lower(masked, BF16), lower(masked, progress=False)
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(f32(x), masked(x), rtol=1e-5, atol=1e-5)
        want = bf16(x)
        save_lowered(bf16, tmp_path / "bf16")
        torch.testing.assert_close(load_lowered(tmp_path / "bf16")(x), want, rtol=0, atol=0)


def test_bad_dtypes_are_typed_errors_naming_the_fix(masked):
    with pytest.raises(LoweringError, match=r"LlvmConfig\(value_dtype=torch.bfloat16\)"):
        lower(masked, "llvm", dtype=torch.bfloat16)
    with pytest.raises(LoweringError, match="value_dtype"):
        lower(masked, LlvmConfig(value_dtype=torch.float16))
    lowered = lower(masked, BF16)
    lowered[0].values = lowered[0].values.float()  # converted after lowering
    with pytest.raises(KernelDtypeError, match="bfloat16"), torch.no_grad():
        lowered(torch.randn(2, 96))


def test_a_convolution_kept_dense_keeps_float32_values():
    """A probe found bfloat16 values rounding the first convolution a user kept dense, once the dense form had
    made it a condensed layer (and only then: with dense_fallback=False it stayed torch's float32)."""
    from srigl_compile.nn.lowered import LoweredConv

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 8, 1))
    sparse = sparsify(net, SRigLConfig(sparsity=0.9, keep_first_dense=True)).eval()
    lowered = lower(sparse, BF16)
    assert isinstance(lowered[0], LoweredConv) and lowered[0].values.dtype == torch.float32
    assert lowered[2].values.dtype == torch.bfloat16
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), _weights_rounded_to_bf16(sparse)(x), rtol=1e-5, atol=1e-5)
