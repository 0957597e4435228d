"""The condensed kernels' TE definitions (``codegen.kernels``) where the lowered-model tests rarely look: a
convolution's residual added before its ReLU, the pack kernels' zero padding, and the size checks that stop a
kernel from being built for operands it cannot address or blocks that do not divide them. Each test failed on a
mutant the rest of the suite let through (mutation probe, session 44)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.runtime.registry import get_handle
from tests.models import WithResidual

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")

from srigl_compile.codegen.kernels import col_kernel, offset_kernel, row_kernel  # noqa: E402


@pytest.mark.parametrize("epilogue", ["add", "add_relu"])
def test_a_convolution_adds_its_residual_before_the_relu(epilogue):
    """The direct kernel's write-back: y = relu(conv(x) + bias + residual), against torch's dense convolution of
    the masked weight; the residual's sign flips many outputs across zero, so relu(conv) + residual differs."""
    from srigl_compile.nn.condensed import CondensedConv

    torch.manual_seed(8)
    masked = sparsify(nn.Sequential(nn.Conv2d(6, 40, 3, padding=1)),
                      SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    conv = masked[0]
    layer = CondensedConv.from_masked(conv)
    layer.set_epilogue_(epilogue)
    x, residual = torch.randn(2, 6, 7, 9), torch.randn(2, 40, 7, 9) * 3
    lowered = lower(WithResidual(layer), example_inputs=(x, residual), progress=False)
    assert get_handle(lowered.layer.kernel_key).spec.epilogue == epilogue
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x.double(), (conv.weight * conv.mask).double(), conv.bias.double(),
                                          padding=1) + residual.double()
        want = want.relu() if epilogue == "add_relu" else want
        for batch in (1, 2):
            torch.testing.assert_close(lowered(x[:batch], residual[:batch]).double(), want[:batch], rtol=1e-5,
                                       atol=1e-5)


def test_the_pack_kernels_zero_the_rows_past_the_batch():
    """``pack_kernel``: xt[t, i, lane] = x[t * lanes + lane, i], zero for rows >= M (the padding lanes the col
    kernel computes for nothing: zeros, never a copy of the last row, whose values may be denormal or NaN)."""
    from srigl_compile.codegen.backends.llvm import build_condensed_linear
    from srigl_compile.runtime.spec import MID_LANES

    handle = build_condensed_linear(5, 7, 1, "int16", True)
    for pack, lanes in ((handle.pack_fn, handle.lanes), (handle.packmid_fn, MID_LANES)):
        for m in (1, lanes - 1, lanes + 3):
            x = torch.randn(m, 7)
            tiles = -(-m // lanes)
            xt = torch.full((tiles, 7, lanes), float("nan"))
            pack(x, xt)
            want = torch.zeros(tiles * lanes, 7)
            want[:m] = x
            assert torch.equal(xt, want.view(tiles, lanes, 7).transpose(1, 2))


def test_int16_indices_are_refused_past_32768_inputs():
    """An int16 index reaches 32767: 2**15 inputs can be addressed, one more cannot (row and col kernels)."""
    assert row_kernel(4, 2**15, 8, "int16", has_bias=False).attrs["srigl.layout"] == "row"
    for build in (lambda: row_kernel(4, 2**15 + 1, 8, "int16"), lambda: col_kernel(4, 2**15 + 1, 8, "int16")):
        with pytest.raises(ValueError, match=r"int16 indices cannot address 32769 inputs; use int32"):
            build()
    assert col_kernel(4, 2**15 + 1, 8, "int32").attrs["srigl.layout"] == "col"


def test_tiled_kernels_refuse_blocks_that_do_not_divide_their_operands():
    """A k-tile must divide k (the reduction runs k / k_tile whole tiles: a remainder would be dropped), and a
    shared offset list must cover whole row groups of a block (share divides block_rows)."""
    with pytest.raises(ValueError, match=r"k_tile dividing k = 12, got \(8, 8\)"):
        col_kernel(4, 16, 12, "int16", block=(8, 8))
    assert col_kernel(4, 16, 12, "int16", block=(8, 4)).attrs["srigl.layout"] == "col"
    with pytest.raises(ValueError, match=r"share block_rows, got 8, 16, 32, 32, 8, 3"):
        offset_kernel(8, 16, 32, True, "s", block_rows=32, k_tile=8, share=3)
    with pytest.raises(ValueError, match="k_tile must divide k"):
        offset_kernel(8, 12, 32, True, "s", block_rows=32, k_tile=8)
    assert offset_kernel(8, 16, 32, True, "s", block_rows=32, k_tile=8, share=4).attrs["srigl.layout"] == "offset"
