"""Kernels that compute GELU or SiLU on their output tile: Linear layers at every batch (row, mid, col, fused
kernels), convolutions, and torch transformer layers whose linear1 takes over the activation. GELU's erf is a
rational approximation in the kernels and SiLU's exp a polynomial, so outputs match torch's to float32 rounding,
not bit for bit."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


ACTIVATIONS = [("gelu", nn.GELU), ("silu", nn.SiLU)]


@pytest.mark.parametrize("name, activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernels_compute_the_activation_at_every_batch(name, activation, bias):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(96, 128, bias=bias), activation(), nn.Linear(128, 10))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    fused = lower(masked, progress=False)
    plain = lower(masked, progress=False, fuse_epilogues=False)
    assert get_handle(fused[0].kernel_key).spec.epilogue == name and isinstance(fused[1], nn.Identity)
    for rows in (1, 2, 5, 64, 300):  # the row, mid, col and fused-pack kernels
        x = torch.randn(rows, 96) * 4  # past erf's clamp at |x / sqrt 2| = 4 too
        with torch.no_grad():
            _close(fused(x), plain(x))
            _close(fused(x), masked(x))


@pytest.mark.parametrize("name, activation", ACTIVATIONS)
def test_a_convolution_computes_its_activation(name, activation):
    torch.manual_seed(4)
    masked = sparsify(nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), activation(), nn.Conv2d(16, 4, 1)),
                      SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    fused = lower(masked, progress=False)
    assert get_handle(fused[0].kernel_key).spec.epilogue == name
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        _close(fused(x), masked(x))


def test_the_silu_kernel_is_exact_to_float32_rounding_over_the_whole_range():
    """The kernel's exp: every power of two's exponent from the clamp at e^-87.3 to e^88.3 and past it; a row
    kernel output y = x (identity weights) isolates the activation."""
    from srigl_compile.nn.condensed import CondensedLinear

    n = 64
    layer = CondensedLinear(n, n, torch.arange(n), torch.ones(n, 1), torch.arange(n, dtype=torch.int16).view(n, 1),
                            torch.zeros(n))
    layer.set_epilogue_("silu")
    lowered = lower(nn.Sequential(layer), progress=False)
    assert get_handle(lowered[0].kernel_key).spec.epilogue == "silu"
    x = torch.cat([torch.linspace(-120, 120, 4000), torch.tensor([-1e4, -1e-30, 0.0, 1e-30, 1e4, 3e38])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % n)).view(-1, n)
    with torch.no_grad():
        got = lowered(x)
    want = torch.nn.functional.silu(x.double())
    torch.testing.assert_close(got.double(), want, rtol=4e-7, atol=1e-30)


def test_a_transformer_encoder_s_linear1_computes_the_gelu_and_the_model_saves_and_exports(tmp_path):
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 7, 16)
    masked = sparsify(model, SRigLConfig(sparsity=0.8), example_inputs=x).eval()
    fused = lower(masked, example_inputs=x, progress=False)
    for encoder_layer in fused[1].layers:
        assert get_handle(encoder_layer.linear1.kernel_key).spec.epilogue == "gelu"
    with torch.no_grad():
        want = masked(x)
        _close(fused(x), want)
        save_lowered(fused, tmp_path / "model")
        _close(load_lowered(tmp_path / "model")(x), want)
        program = torch.export.export(fused, (x,), strict=False)
        _close(program.module()(x), want)


@pytest.mark.parametrize("epilogue", ["gelu", "silu"])
def test_the_activations_are_vector_code_not_libm_calls(epilogue):
    """TVM's own erf / exp on llvm are a scalar libm call per element; the kernels' expressions vectorise."""
    import re

    from srigl_compile.codegen.backends.llvm import build_linear
    from srigl_compile.runtime.spec import KernelSpec

    asm = build_linear(KernelSpec(64, 96, 16, "int16", True, epilogue=epilogue)).module.inspect_source("asm")
    assert not re.search(r"call\w*\s+\*?(exp|erf|expf|erff)(@PLT)?\s", asm)
    assert "vfmadd" in asm


@pytest.mark.parametrize("activation", [nn.ReLU, nn.GELU, nn.SiLU])
def test_a_nan_sample_comes_out_nan_through_every_fused_activation(activation):
    """A fused ReLU computed max(y, 0), whose LLVM maxnum returns 0 for a NaN y: a lowered model turned NaN inputs
    into finite outputs (a probe, 2026-12-06). A whole sample NaN, as torch would give it (a NaN inside a sample
    spreads further in the masked model, whose masked-out weights still multiply it: 0 x NaN)."""
    torch.manual_seed(5)
    linear = sparsify(nn.Sequential(nn.Linear(96, 128), activation(), nn.Linear(128, 10)),
                      SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    conv = sparsify(nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), activation(), nn.Conv2d(16, 4, 1)),
                    SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    inputs = {id(linear): [torch.randn(rows, 96) for rows in (1, 2, 5, 64, 300)],  # (every Linear kernel)
              id(conv): [torch.randn(2, 6, 9, 11)]}
    for masked in (linear, conv):
        fused = lower(masked, progress=False)
        assert get_handle(fused[0].kernel_key).spec.epilogue != ""
        for x in inputs[id(masked)]:
            x[0] = float("nan")
            with torch.no_grad():
                got, want = fused(x), masked(x)
            assert want[0].isnan().all() and want[1:].isfinite().all()
            assert got[0].isnan().all()
            _close(got[1:], want[1:])
