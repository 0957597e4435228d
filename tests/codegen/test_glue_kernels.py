"""The TVM glue in a direct convolution's library (``codegen.glue_kernels``): padding / phase-splitting its input
and cropping its output grid, against plain torch indexing; the max-pool and the global average pool against
torch's; and lowered convolutions with and without the copies."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.runtime import conv_op
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def glue():
    tvm = pytest.importorskip("tvm")
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.glue_kernels import glue_funcs

    executable = tvm.compile(tvm.IRModule(glue_funcs(lambda name: f"test_glue_{name}")),
                             target=tvm.target.Target(host_llvm_target()))
    return (executable["test_glue_pad"], executable["test_glue_crop"], executable["test_glue_max_pool"],
            executable["test_glue_global_avg_pool"])


def padded_reference(x, phases, rows, pitch, top, left, stride):
    """y[n, a, b, u, v] = x[n, s_h * u + a - top, s_w * v + b - left], zero outside x (indexing, no pad op)."""
    n, height, width = x.shape
    a = torch.arange(phases[0]).view(-1, 1, 1, 1)
    b = torch.arange(phases[1]).view(1, -1, 1, 1)
    u = torch.arange(rows).view(1, 1, -1, 1)
    v = torch.arange(pitch).view(1, 1, 1, -1)
    i, j = stride[0] * u + a - top, stride[1] * v + b - left
    inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
    values = x[:, i.clamp(0, height - 1), j.clamp(0, width - 1)]
    return torch.where(inside, values, torch.zeros(()))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 5), height=st.integers(1, 11), width=st.integers(1, 11), rows=st.integers(1, 9),
       pitch=st.integers(1, 9), top=st.integers(-3, 3), left=st.integers(-3, 3), stride_h=st.integers(1, 3),
       stride_w=st.integers(1, 3), whole=st.booleans(), seed=st.integers(0, 2**16))
def test_pad_images_pads_crops_and_splits_phases_like_indexing(glue, n, height, width, rows, pitch, top, left,
                                                                stride_h, stride_w, whole, seed):
    pad = glue[0]
    phases = (stride_h, stride_w) if whole else (1, 1)  # every phase image, or the first (a subsample)
    x = torch.randn(n, height, width, generator=torch.Generator().manual_seed(seed))
    y = torch.full((n, *phases, rows, pitch), float("nan"))  # every element must be written
    pad(x, y, top, left, stride_h, stride_w)
    assert torch.equal(y, padded_reference(x, phases, rows, pitch, top, left, (stride_h, stride_w)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), out_h=st.integers(1, 9), out_w=st.integers(1, 9), extra_columns=st.integers(0, 3),
       tail=st.integers(0, 70))
def test_crop_grid_drops_the_padding_columns(glue, n, out_h, out_w, extra_columns, tail):
    crop = glue[1]
    pitch = out_w + extra_columns
    grid = torch.randn(n, out_h * pitch + tail)
    y = torch.full((n, out_h, out_w), float("nan"))
    crop(grid, y, pitch)
    assert torch.equal(y, grid[:, :out_h * pitch].view(n, out_h, pitch)[..., :out_w])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 4), height=st.integers(1, 12), width=st.integers(1, 12), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       data=st.data())
def test_max_pool_equals_torch(glue, n, height, width, kh, kw, sh, sw, dh, dw, data):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))  # torch: pad <= kernel / 2
    if height + 2 * ph < dh * (kh - 1) + 1 or width + 2 * pw < dw * (kw - 1) + 1:
        return  # no output (torch raises)
    x = torch.randn(n, height, width)
    x[torch.rand(x.shape) < data.draw(st.sampled_from([0.0, 0.05]))] = float("nan")  # a NaN in a window wins
    expected = F.max_pool2d(x[None], (kh, kw), (sh, sw), (ph, pw), (dh, dw))[0]
    y = torch.full(expected.shape, 7.0)
    glue[2](x, y, kh, kw, sh, sw, ph, pw, dh, dw)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), positions=st.integers(1, 60), gap=st.integers(0, 17), seed=st.integers(0, 2**16))
def test_global_avg_pool_equals_torch(glue, n, positions, gap, seed):
    """Whole blocks of 16 images and a ragged tail; images ``gap`` floats apart beyond their size (planar)."""
    gen = torch.Generator().manual_seed(seed)
    storage = torch.randn(n, positions + gap, generator=gen) * 10
    storage[:, positions:] = float("nan")  # the gaps are never read
    x = storage[:, :positions]
    y = torch.full((n,), 7.0)
    glue[3](x, y)
    torch.testing.assert_close(y, x.double().mean(1).float(), rtol=1e-6, atol=1e-5)


def test_global_avg_pool_stays_exact_on_large_maps(glue):
    """A 2048 x 2048 map of values near 5.5: one float32 running sum drifts 2.5e-2 (its steps outgrow the values),
    the kernel's blocked sums ~5e-6 (16384 block sums added to a total past 2^24)."""
    x = torch.rand(17, 2048 * 2048, generator=torch.Generator().manual_seed(0)) + 5
    y = torch.empty(17)
    glue[3](x, y)
    torch.testing.assert_close(y, x.double().mean(1).float(), rtol=2e-5, atol=0)


CONVS = [nn.Conv2d(5, 7, 3, padding=1), nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.Conv2d(5, 7, 1, stride=2),
         nn.Conv2d(5, 7, (3, 2), stride=(2, 3), padding=(2, 0), dilation=(2, 1))]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"k{c.kernel_size}s{c.stride}p{c.padding}d{c.dilation}")
def test_lowered_convs_equal_masked_with_and_without_the_tvm_copies(conv, monkeypatch):
    """The copies are the library's (``pad_fn`` / ``crop_fn``); a library saved before they existed has neither
    and runs torch's pad, permute and crop instead: both give the masked model's outputs."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(conv), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    layer = lowered[0]
    assert isinstance(layer, LoweredConv) and layer.direct
    handle = get_handle(layer.kernel_key)
    assert handle.pad_fn is not None and handle.crop_fn is not None
    for shape in ((1, 5, 9, 11), (3, 5, 8, 7)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = masked(x)
            torch.testing.assert_close(lowered(x), expected, rtol=1e-5, atol=1e-5)
            with monkeypatch.context() as patch:
                patch.setattr(handle, "pad_fn", None)
                patch.setattr(handle, "crop_fn", None)
                torch.testing.assert_close(lowered(x), expected, rtol=1e-5, atol=1e-5)


def test_subsample_images_is_the_strided_view_as_a_copy():
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Conv2d(4, 6, 1, stride=2)), SRigLConfig(sparsity=0.5)).eval()
    key = lower(masked, progress=False)[0].kernel_key
    x = torch.randn(2, 4, 7, 10)
    copied = conv_op.subsample_images(x, (2, 3), key)
    assert copied.is_contiguous() and torch.equal(copied, x[:, :, ::2, ::3])
    as_double = x.double()  # not what the kernel takes: the view, and the kernel call raises its typed error
    assert conv_op.subsample_images(as_double, (2, 3), key).data_ptr() == as_double.data_ptr()
    # a tracer's call: the op, a tensor of its own laid out as the eager copy (the fake says so too)
    traced = torch.ops.srigl_compile.tvm_subsample_images(x, [2, 3], key)
    assert torch.equal(traced, x[:, :, ::2, ::3]) and traced.stride() == copied.stride()
    assert traced.untyped_storage().data_ptr() != copied.untyped_storage().data_ptr()
    torch.library.opcheck(torch.ops.srigl_compile.tvm_subsample_images.default, (x, [2, 3], key))
