"""The floats between a convolution's padded images (lanes its kernel computes for nothing, then crops) are zeroed
by the glue that writes the images, wherever a lowered convolution has it write them: junk left there from an
earlier call could be denormal, and each denormal operand costs the kernel a microcode assist. A probe found the
stride-1 images left as they were: the phase axes of size 1 reached the kernel with compact strides."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.runtime import scratch

pytestmark = pytest.mark.tvm


def lowered_conv(conv: nn.Conv2d) -> nn.Module:
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(conv), SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    return lower(masked, progress=False)[0]


def junk_then_call(slot: str, call) -> torch.Tensor:
    """Call once on fresh pools (the slot's buffer is made, of the call's size: an earlier test's larger one would
    keep a tail no call writes), fill the buffer with NaN, call again: the buffer afterwards."""
    scratch.release_scratch()
    with torch.no_grad():
        call()
        buffer = scratch._buffers()[(slot, torch.float32)]
        buffer.fill_(float("nan"))
        call()
    return buffer


@pytest.mark.parametrize("stride", [1, 2])
def test_a_padded_convolution_s_images_leave_no_junk_between_them(stride):
    layer = lowered_conv(nn.Conv2d(4, 8, 3, padding=1, stride=stride))
    x = torch.randn(1, 4, 9, 11)
    buffer = junk_then_call("padded", lambda: layer(x))
    assert not buffer.isnan().any()


class ConvPlusInput(nn.Module):
    """conv(x) + x: lower fuses the add into the kernel (in a block, not the model itself), which reads x placed in
    the padded output grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def test_a_cropped_convolution_s_residual_grid_leaves_no_junk_after_each_image():
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(ConvPlusInput()), SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    assert lowered[0].conv.fused_epilogue, "the add runs in the kernel"
    x = torch.randn(1, 8, 9, 11)
    buffer = junk_then_call("residual", lambda: lowered(x))
    assert not buffer.isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)


def test_a_strided_pointwise_convolution_s_subsampled_images_leave_no_junk_between_them():
    layer = lowered_conv(nn.Conv2d(4, 8, 1, stride=2))
    x = torch.randn(1, 4, 10, 10)  # 5 x 5 = 25 floats an image, planes of whole 16-float vectors: 7 between
    buffer = junk_then_call("subsampled", lambda: layer(x))
    assert buffer.shape[-1] > 25 and not buffer.isnan().any()
