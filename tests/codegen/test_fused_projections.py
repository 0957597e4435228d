"""Lowered transformer layers compute self-attention's q, k and v with one kernel (``FuseProjectionsPass``);
cross-attention keeps three; the model equals the masked one, saves, loads and exports."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.lowered import LoweredLinear

pytestmark = pytest.mark.tvm


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x, y):
        return self.decoder(y, self.encoder(x))


def test_self_attention_runs_one_stacked_kernel_and_the_model_saves_loads_and_exports(tmp_path):
    torch.manual_seed(6)
    x, y = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    masked = sparsify(EncoderDecoder(), SRigLConfig(sparsity=0.8), example_inputs=(x, y)).eval()
    lowered = lower(masked, example_inputs=(x, y), progress=False)
    for attention in (lowered.encoder.self_attn, lowered.decoder.self_attn):
        assert isinstance(attention.qkv_proj, LoweredLinear) and attention.qkv_proj.n_out == 96
        assert attention.q_proj is None
    assert isinstance(lowered.decoder.multihead_attn.q_proj, LoweredLinear)
    assert lowered.decoder.multihead_attn.qkv_proj is None
    with torch.no_grad():
        want = masked(x, y)
        torch.testing.assert_close(lowered(x, y), want, rtol=1e-4, atol=1e-5)
        for rows in (1, 70):  # the row kernel (one token) and the col kernel's tiles
            xs = torch.randn(1, rows, 32)
            torch.testing.assert_close(lowered.encoder(xs), masked.encoder(xs), rtol=1e-4, atol=1e-5)
        save_lowered(lowered, tmp_path / "model")
        torch.testing.assert_close(load_lowered(tmp_path / "model")(x, y), want, rtol=1e-4, atol=1e-5)
        program = torch.export.export(lowered, (x, y), strict=False)
        torch.testing.assert_close(program.module()(x, y), want, rtol=1e-4, atol=1e-5)


def test_the_stacked_kernel_computes_what_three_kernels_compute_bit_for_bit(monkeypatch):
    from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention

    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 9, 32)
    masked = sparsify(nn.Sequential(layer), SRigLConfig(sparsity=0.8), example_inputs=(x,)).eval()
    fused = lower(masked, example_inputs=(x,), progress=False)
    monkeypatch.setattr(CondensedMultiheadAttention, "fuse_projections_", lambda self: False)
    separate = lower(masked, example_inputs=(x,), progress=False)
    assert fused[0].self_attn.qkv_proj is not None and separate[0].self_attn.qkv_proj is None
    with torch.no_grad():
        for rows in (1, 2, 5, 70, 300):  # the row, mid, col and fused-pack kernels
            xs = torch.randn(1, rows, 32)
            torch.testing.assert_close(fused(xs), separate(xs), rtol=0, atol=0)
