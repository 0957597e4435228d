"""Kernels that compute GELU on their output tile: Linear layers at every batch (row, mid, col, fused kernels),
convolutions, and torch transformer layers whose linear1 takes over the activation. GELU's erf is a rational
approximation in the kernels, so outputs match torch's to float32 rounding, not bit for bit."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernels_compute_the_gelu_at_every_batch(bias):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(96, 128, bias=bias), nn.GELU(), nn.Linear(128, 10))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    fused = lower(masked, progress=False)
    plain = lower(masked, progress=False, fuse_epilogues=False)
    assert get_handle(fused[0].kernel_key).spec.epilogue == "gelu" and isinstance(fused[1], nn.Identity)
    for rows in (1, 2, 5, 64, 300):  # the row, mid, col and fused-pack kernels
        x = torch.randn(rows, 96) * 4  # past erf's clamp at |x / sqrt 2| = 4 too
        with torch.no_grad():
            _close(fused(x), plain(x))
            _close(fused(x), masked(x))


def test_a_convolution_computes_its_gelu():
    torch.manual_seed(4)
    masked = sparsify(nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 4, 1)),
                      SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    fused = lower(masked, progress=False)
    assert get_handle(fused[0].kernel_key).spec.epilogue == "gelu"
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        _close(fused(x), masked(x))


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
