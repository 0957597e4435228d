"""The stacked q / k / v projection of a fused self-attention keeps each projection's own bias: outputs equal
the masked encoder's (torch's attention) with biases that differ between q, k and v (torch initialises
in_proj_bias to zeros, where any bias would do). Failed on a mutant the rest of the suite let through (mutation
probe, session 44)."""

import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fuse_projections import FuseProjectionsPass


def test_fused_self_attention_keeps_the_q_k_and_v_biases_apart():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with torch.no_grad():
        layer.self_attn.in_proj_bias.copy_(torch.randn(48))  # q, k and v biases all different
    x = torch.randn(2, 5, 16)
    masked = sparsify(nn.Sequential(layer), SRigLConfig(sparsity=0.7, distribution="uniform", ablation=False),
                      example_inputs=(x,)).eval()
    condensed = condense(masked, example_inputs=(x,)).eval()
    fuse = FuseProjectionsPass()
    assert fuse(condensed).modified and fuse.fused == ["0.self_attn"]
    stacked = condensed[0].self_attn.qkv_proj
    torch.testing.assert_close(stacked.full_bias, layer.self_attn.in_proj_bias.detach(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), masked(x), rtol=1e-5, atol=1e-5)
        q = torch.randn(2, 3, 16)  # other keys and values: the stacked layer's rows read per input
        want = masked[0].self_attn(q, x, x, need_weights=False)[0]
        torch.testing.assert_close(condensed[0].self_attn(q, x, x, need_weights=False)[0], want, rtol=1e-5,
                                   atol=1e-5)
