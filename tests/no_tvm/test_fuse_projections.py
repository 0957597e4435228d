"""FuseProjectionsPass on condensed models (no kernels): which attention modules get one stacked q/k/v layer, and
outputs unchanged, for self-attention and for calls that pass other keys and values."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.nn.condensed import CondensedLinear
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fuse_projections import FuseProjectionsPass


class OwnAttention(nn.Module):
    """Attention the model's own code calls (here as self-attention, but the pass cannot know): left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _condensed(model: nn.Module, *example) -> nn.Module:
    torch.manual_seed(0)
    masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform", ablation=False),
                      example_inputs=example)
    return condense(masked, example_inputs=example).eval()


def test_the_self_attention_of_transformer_layers_gets_one_stacked_layer_and_outputs_do_not_change():
    encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder, self.own = encoder, decoder, OwnAttention()

        def forward(self, x, y):
            return self.own(self.decoder(y, self.encoder(x)))

    x, y = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    model = _condensed(Net(), x, y)
    with torch.no_grad():
        before = model(x, y)
    fuse = FuseProjectionsPass()
    result = fuse(model)
    assert result.modified and fuse.fused == ["encoder.self_attn", "decoder.self_attn"]
    for attention in (model.encoder.self_attn, model.decoder.self_attn):
        assert isinstance(attention.qkv_proj, CondensedLinear) and attention.q_proj is None
        assert attention.qkv_proj.out_features == 48 and attention.qkv_proj.values.shape[1] == \
            model.decoder.multihead_attn.q_proj.values.shape[1]
    assert model.decoder.multihead_attn.qkv_proj is None, "cross-attention keeps its three layers"
    assert model.own.attn.qkv_proj is None, "attention called by the model's own code is left alone"
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), before, rtol=1e-6, atol=1e-6)
    assert not FuseProjectionsPass()(model).modified, "fused already: nothing to do"


def test_a_fused_module_called_with_other_keys_and_values_still_computes_attention():
    model = _condensed(nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)),
                       torch.randn(1, 4, 16))
    attention = model[0].self_attn
    reference = CondensedMultiheadAttention(16, 4, True, attention.q_proj, attention.k_proj, attention.v_proj,
                                            attention.out_proj)
    assert attention.fuse_projections_()
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        for args in ((q, k, v), (q, q, q), (k, k, v)):
            torch.testing.assert_close(attention(*args)[0], reference(*args)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["k", "bias", "epilogue"])
def test_projections_that_differ_are_not_fused(change):
    model = _condensed(nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)),
                       torch.randn(1, 4, 16))
    attention = model[0].self_attn
    v = attention.v_proj
    if change == "k":
        attention.v_proj = CondensedLinear(16, 16, v.active, v.values[:, :-1], v.indices[:, :-1], v.full_bias)
    elif change == "bias":
        attention.v_proj = CondensedLinear(16, 16, v.active, v.values, v.indices, None)
    else:
        v.set_epilogue_("relu")
    assert not attention.fuse_projections_() and attention.qkv_proj is None and attention.q_proj is not None
