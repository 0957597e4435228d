"""Linear kernels that add a residual as they write their output (the "add" and "add_relu" epilogues) at every
batch (row, mid, col with a ragged tail, fused kernels), and torch TransformerEncoderLayers whose linear2 and
out_proj take over the layer's two residual adds. The kernels compute relu(acc + bias + residual): the reference's
float operations, so results match the condensed layer's to float32 rounding of the sum order only."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.errors import LoweringError
from srigl_compile.nn.condensed import CondensedLinear
from srigl_compile.nn.transformer_layers import ResidualEncoderLayer
from srigl_compile.runtime.registry import get_handle
from tests.models import WithResidual

pytestmark = pytest.mark.tvm


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _layer(n_out: int, n_in: int, k: int, bias: bool, epilogue: str) -> CondensedLinear:
    gen = torch.Generator().manual_seed(n_out + k)
    indices = torch.rand(n_out, n_in, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values
    layer = CondensedLinear(n_in, n_out, torch.arange(n_out), torch.randn(n_out, k, generator=gen), indices,
                            torch.randn(n_out, generator=gen) if bias else None)
    layer.set_epilogue_(epilogue)
    return layer


@pytest.mark.parametrize("epilogue", ["add", "add_relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernels_add_the_residual_at_every_batch(epilogue, bias):
    layer = _layer(96, 80, 13, bias, epilogue)
    model = WithResidual(layer)
    lowered = lower(model, example_inputs=(torch.randn(4, 80), torch.randn(4, 96)), progress=False)
    assert get_handle(lowered.layer.kernel_key).spec.epilogue == epilogue and lowered.layer.fused_epilogue
    for rows in (1, 2, 5, 64, 70, 300, 600):  # row, mid, col, col + a mid tail, fused (from 4 tiles a thread)
        x, residual = torch.randn(rows, 80), torch.randn(rows, 96)
        with torch.no_grad():
            _close(lowered(x, residual), model(x, residual))
    x = torch.randn(2, 35, 80)
    with torch.no_grad():
        for residual in (torch.randn(2, 35, 96), torch.randn(1, 35, 96), torch.randn(96),
                         torch.randn(35, 2, 96).transpose(0, 1)):  # broadcast or strided: copied for the kernel
            _close(lowered(x, residual), model(x, residual))
        with pytest.raises(LoweringError, match=r"residual of shape \(3, 35, 96\).*layer.*\(2, 35, 96\)"):
            lowered(x, torch.randn(3, 35, 96))


def test_the_op_refuses_a_residual_its_kernel_does_not_add():
    from srigl_compile.runtime.linear_op import condensed_linear

    plain = lower(nn.Sequential(_layer(16, 24, 5, True, "")), progress=False)[0]
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="epilogue ''.*residual=a tensor"):
        condensed_linear(x, plain.values, plain.indices, plain.bias, plain.kernel_key, 0, torch.randn(3, 16))
    adding = lower(WithResidual(_layer(16, 24, 5, True, "add")), example_inputs=(x, torch.randn(3, 16)),
                   progress=False).layer
    with pytest.raises(ValueError, match="epilogue 'add'.*residual=None"):
        condensed_linear(x, adding.values, adding.indices, adding.bias, adding.kernel_key, 0, None)


@pytest.mark.parametrize("norm_first", [True, False])
def test_a_transformer_encoder_adds_its_residuals_in_its_kernels_and_saves_and_exports(norm_first, tmp_path):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 7, 16)
    masked = sparsify(model, SRigLConfig(sparsity=0.8), example_inputs=x).eval()
    lowered = lower(masked, example_inputs=x, progress=False)
    for encoder_layer in lowered[1].layers:
        assert type(encoder_layer) is ResidualEncoderLayer
        for adding in (encoder_layer.linear2, encoder_layer.self_attn.out_proj):
            assert get_handle(adding.kernel_key).spec.epilogue == "add"
    with torch.no_grad():
        for shape in ((1, 1, 16), (1, 2, 16), (2, 3, 16), (1, 70, 16), (3, 197, 16)):  # every kernel
            x = torch.randn(shape)
            _close(lowered(x), masked(x))
        want = masked(x)
        save_lowered(lowered, tmp_path / "model")
        _close(load_lowered(tmp_path / "model")(x), want)
        program = torch.export.export(lowered, (x,), strict=False)
        _close(program.module()(x), want)
