"""The glue TIR (``codegen.glue_kernels``) called directly on what the lowered models rarely give it: planar outputs
whose gaps must come out zeroed, max-pool windows wholly in the padding (-inf, as torch), the pad contract for a
phase image of a stride-1 axis, and the norms' eps where it decides the result (constant rows, tiny rows). Each
test failed on a mutant the rest of the suite let through (mutation probe, session 44)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def glue():
    """{name: packed function} for every glue function, compiled once for the module."""
    tvm = pytest.importorskip("tvm")
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.glue_kernels import glue_funcs
    from srigl_compile.runtime.spec import CONV_GLUE, LINEAR_GLUE

    names = tuple(n for n in CONV_GLUE + LINEAR_GLUE if n != "attention")
    executable = tvm.compile(tvm.IRModule(glue_funcs(lambda name: f"checks_glue_{name}", names)),
                             target=tvm.target.Target(host_llvm_target()))
    return {name: executable[f"checks_glue_{name}"] for name in names}


def _padded(x, phases, rows, pitch, top, left, stride):
    """y[n, a, b, u, v] = x[n, s_h u + a - top, s_w v + b - left], zero outside x, by plain loops over float64."""
    n, height, width = x.shape
    y = torch.zeros(n, *phases, rows, pitch, dtype=torch.float64)
    for a in range(phases[0]):
        for b in range(phases[1]):
            for u in range(rows):
                for v in range(pitch):
                    i, j = stride[0] * u + a - top, stride[1] * v + b - left
                    if 0 <= i < height and 0 <= j < width:
                        y[:, a, b, u, v] = x[:, i, j].double()
    return y.float()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), height=st.integers(1, 7), width=st.integers(1, 7), rows=st.integers(1, 6),
       pitch=st.integers(1, 6), top=st.integers(-2, 2), left=st.integers(-2, 2), stride=st.integers(2, 3),
       gap=st.integers(1, 9))
def test_pad_zeroes_every_gap_float_between_planar_images(glue, n, height, width, rows, pitch, top, left, stride,
                                                          gap):
    """y's phase images lie ``gap`` floats further apart than their size; the gaps (junk in memory, which the
    convolution computes lanes from for nothing) must be zero after the call, the images equal to the padding.
    (Strided: a single phase's axes have size 1, and only explicit strides, as conv_op passes them, carry the gap:
    tests/codegen/test_planar_gaps.py.)"""
    phases = (stride, stride)
    x = torch.randn(n, height, width)
    buffer = torch.full((n, *phases, rows * pitch + gap), float("nan"))
    y = buffer[..., :rows * pitch].unflatten(-1, (rows, pitch))
    glue["pad"](x, y, top, left, stride, stride)
    assert torch.equal(y, _padded(x, phases, rows, pitch, top, left, phases))
    assert torch.equal(buffer[..., rows * pitch:], torch.zeros(n, *phases, gap))


def test_pad_reads_phase_columns_on_a_stride_one_axis(glue):
    """The contract (module docstring) holds for any phase count: with stride_w 1, phase b reads column v + b -
    left (the stride-1 copy loop must add b, as the strided one does)."""
    x = torch.randn(2, 5, 6)
    for phases, strides in (((1, 3), (1, 1)), ((2, 2), (2, 1))):
        y = torch.full((2, *phases, 4, 7), float("nan"))
        glue["pad"](x, y, 1, 1, *strides)
        assert torch.equal(y, _padded(x, phases, 4, 7, 1, 1, strides))


@pytest.mark.parametrize("out_h, out_w, pitch, gap", [(3, 4, 6, 5), (1, 1, 1, 1), (5, 7, 7, 16)])
def test_crop_zeroes_the_gap_after_each_planar_image(glue, out_h, out_w, pitch, gap):
    n = 3
    grid = torch.randn(n, out_h * pitch + 2)
    buffer = torch.full((n, out_h * out_w + gap), float("nan"))
    y = buffer[:, :out_h * out_w].view(n, out_h, out_w)
    glue["crop"](grid, y, pitch)
    assert torch.equal(y, grid[:, :out_h * pitch].view(n, out_h, pitch)[..., :out_w])
    assert torch.equal(buffer[:, out_h * out_w:], torch.zeros(n, gap))


# (height, width, kernel, stride, padding, dilation): the dilated taps straddle a one-pixel axis, so some windows
# hold padding only (torch: -inf there)
ALL_PADDING = [(1, 4, (2, 1), (1, 1), (1, 0), (2, 1)), (3, 1, (1, 2), (1, 1), (0, 1), (1, 2)),
               (1, 1, (2, 2), (1, 1), (1, 1), (2, 2))]


@pytest.mark.parametrize("height, width, kernel, stride, padding, dilation", ALL_PADDING)
def test_max_pool_windows_wholly_in_the_padding_are_minus_infinity(glue, height, width, kernel, stride, padding,
                                                                   dilation):
    x = torch.randn(2, height, width)
    want = F.max_pool2d(x[None], kernel, stride, padding, dilation)[0]
    assert torch.isneginf(want).any(), "the case must have an all-padding window"
    y = torch.full(want.shape, 7.0)
    glue["max_pool"](x, y, *kernel, *stride, *padding, *dilation)
    assert torch.equal(y, want)


@pytest.mark.parametrize("width", [7, 16, 40])
def test_layer_norm_puts_eps_under_the_square_root(glue, width):
    """Rows of variance comparable to eps, and a constant row (var 0: y = bias exactly, rstd = eps^-1/2)."""
    eps = 0.25
    x = torch.randn(4, width) * torch.tensor([[0.1], [0.5], [2.0], [0.0]]) + 3.0
    weight, bias = torch.randn(width), torch.randn(width)
    y = torch.empty(4, width)
    glue["layer_norm"](x, weight, bias, y, eps)
    want = F.layer_norm(x.double(), (width,), weight.double(), bias.double(), eps)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 40), scale=st.sampled_from([0.0, 1e-3, 1e-2, 1.0, 30.0]),
       eps=st.sampled_from([1e-6, 1e-4, 1e-2]), seed=st.integers(0, 2**16))
def test_rms_norm_equals_float64_at_every_scale_and_eps(glue, width, scale, eps, seed):
    """y = w x / sqrt(mean(x^2) + eps): where mean(x^2) is near or below eps, eps decides y (a zero row stays 0,
    not 0 x inf); widths below, at and past the kernel's 16-lane vectors (a scalar tail)."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(3, width, generator=gen) * scale, torch.randn(width, generator=gen)
    y = torch.empty(3, width)
    glue["rms_norm"](x, weight, y, eps)
    xd = x.double()
    want = weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
