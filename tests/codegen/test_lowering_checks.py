"""Lowering passes and runtime pieces: properties a mutation probe (session 42) found no test pinned down (stacked
q/k/v biases, attention masks on the kernel path, batch chunks, planar layouts, conv + max-pool fusion); each test
fails on its mutant."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn import batch_chunks
from srigl_compile.nn.batch_chunks import ChunkedSequential, per_sample
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.nn.settle import settle
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fuse_projections import FuseProjectionsPass
from srigl_compile.zoo import ResNet

pytestmark = pytest.mark.tvm

# --- F2: stacked q/k/v with one projection's bias for all three -----------------------------------------------

def test_stacked_qkv_keeps_each_projection_s_own_bias():
    """Mutant: fuse_projections_ stacked q's bias three times (k's and v's biases lost)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with torch.no_grad():  # (torch initialises in_proj_bias to zeros: every stacking of zeros is right)
        layer.self_attn.in_proj_bias.normal_()
    x = torch.randn(2, 5, 16)
    masked = sparsify(nn.Sequential(layer), SRigLConfig(sparsity=0.7, distribution="uniform", ablation=False),
                      example_inputs=(x,))
    model = condense(masked, example_inputs=(x,)).eval()
    with torch.no_grad():
        before = model(x)
        assert FuseProjectionsPass()(model).modified and model[0].self_attn.qkv_proj is not None
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), masked.eval()(x), rtol=1e-5, atol=1e-5)


# --- A5: attn_mask dropped when a key padding mask is also given ---------------------------------------------

@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_applies_both_attn_mask_and_key_padding_mask(need_weights):
    """Mutant: _additive_mask kept only the key padding mask when both masks were given."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    cond = CondensedMultiheadAttention.from_attention(mha).eval()
    x = torch.randn(2, 6, 16)
    attn_mask = torch.randn(6, 6)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        want, want_w = mha(x, x, x, key_padding_mask=pad, attn_mask=attn_mask, need_weights=need_weights)
        got, got_w = cond(x, x, x, key_padding_mask=pad, attn_mask=attn_mask, need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


# --- A1 / A2: the attention kernel path ignoring attn_mask / is_causal ----------------------------------------

@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(128, 2, 256, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 11, 128)
    masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform"), example_inputs=(x,)).eval()
    lowered = lower(masked, example_inputs=(x,), progress=False)
    attentions = [m for m in lowered.modules() if isinstance(m, CondensedMultiheadAttention)]
    assert attentions and all(m.attention_key for m in attentions), "the attention kernel is in use"
    return masked, lowered, x


def test_lowered_attention_with_an_attn_mask_applies_it(encoder):
    """Mutant: the attention-kernel path was taken for calls with an attn_mask (the mask ignored)."""
    masked, lowered, x = encoder
    torch.manual_seed(4)
    mask = torch.rand(11, 11) < 0.3  # (not causal: the encoder passes is_causal=False; a float mask makes
    mask.fill_diagonal_(False)       # torch's own encoder return NaN here)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x, mask=mask), masked(x, mask=mask), rtol=1e-5, atol=1e-5)


def test_lowered_attention_called_causal_is_causal(encoder):
    """Mutant: the attention-kernel path was taken for is_causal=True calls without a mask (causality dropped)."""
    masked, lowered, x = encoder
    causal = torch.full((11, 11), float("-inf")).triu(1)
    with torch.no_grad():
        want = masked.layers[0].self_attn(x, x, x, attn_mask=causal, need_weights=False)[0] + x
        # (the lowered out projection adds the layer's residual in its epilogue)
        got = lowered.layers[0].self_attn(x, x, x, is_causal=True, need_weights=False, residual=x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- B1: any tensor method counted per-sample ----------------------------------------------------------------

class _ScaledByBatchMean(nn.Module):
    """Mixes the images of a batch through a method call (``Tensor.mean`` over the batch) and a product."""

    def forward(self, x):
        return x * x.mean(0, keepdim=True)


def test_a_stack_whose_graph_calls_a_batch_reducing_method_is_never_chunked(monkeypatch):
    """Mutant: _per_sample_node accepted every call_method (x.mean(0) too), so a batch-mixing stack ran in chunks."""
    torch.manual_seed(0)
    model = ResNet(num_classes=10, blocks=(1, 1), width=8).eval()
    model.layers.insert(1, fx.symbolic_trace(_ScaledByBatchMean()))
    x = torch.randn(4, 3, 32, 32)
    sparse = sparsify(model, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x[:2],)).eval()
    lowered = lower(sparse, LlvmConfig(dense_fallback=False, progress=False))

    def chunks_always_faster(model, *args, **kwargs):
        model(*args, **kwargs)
        chunked = any(size for m in model.modules() if isinstance(m, ChunkedSequential)
                      for size in m.chunk_sizes.values())
        return 1.0 if chunked else 2.0

    monkeypatch.setattr(batch_chunks, "_forward_seconds", chunks_always_faster)
    with torch.no_grad():
        settle(lowered, x)
        torch.testing.assert_close(lowered(x), sparse(x), rtol=1e-4, atol=1e-4)
    assert not per_sample(fx.symbolic_trace(_ScaledByBatchMean()))


# --- P3: a convolution called twice marked by its last call's readers only -----------------------------------

class _CalledTwice(nn.Module):
    """One convolution called twice: the first call's output torch reads with ``.view`` (needs contiguous), the
    second's a 1x1 convolution reads (would take planar images)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.next = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        a = self.conv(x)
        s = a.view(a.shape[0], -1).mean(-1)[:, None, None, None]  # (merges channels with pixels: contiguous only)
        return self.next(self.conv(x * 2)) + s


def test_a_convolution_called_twice_stays_contiguous_when_one_call_feeds_torch():
    """Mutant: PlanarLayoutPass kept the last call's layout only (a call torch reads got planar output)."""
    torch.manual_seed(1)
    masked = sparsify(_CalledTwice(), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 8, 14, 14),), progress=False)
    x = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
    assert not lowered.conv.planar_output


# --- C2: a max-pool called twice fused with the convolution one call reads ---------------------------------

class _SharedPool(nn.Module):
    """One max-pool module called twice: on a convolution's output (that conv read by it alone) and on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x)) + self.pool(x)


def test_a_max_pool_called_twice_is_not_fused_with_one_call_s_convolution():
    """Mutant: FuseConvPoolPass fused a pool called twice (its other call then ran the convolution too)."""
    torch.manual_seed(0)
    masked = sparsify(_SharedPool(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False),
                    example_inputs=(torch.randn(1, 16, 12, 12),))
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
    assert type(lowered.pool).__name__ != "LoweredConvMaxPool"


# --- C3: a strided 1x1 (subsampling) convolution fused with its max-pool -------------------------------------

class _StridedPointwiseThenPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(16, 32, 1, stride=2), nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(self.conv(x))


def test_a_strided_pointwise_convolution_read_by_a_max_pool_still_runs():
    """Mutant: can_fuse_conv_pool accepted a subsampling (strided 1x1) conv; the bands then fed it the whole image."""
    torch.manual_seed(0)
    masked = sparsify(_StridedPointwiseThenPool(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False),
                    example_inputs=(torch.randn(1, 16, 20, 20),))
    with torch.no_grad():
        for shape in ((2, 16, 20, 20), (1, 16, 23, 17)):
            x = torch.randn(*shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
    assert type(lowered.pool).__name__ != "LoweredConvMaxPool"
