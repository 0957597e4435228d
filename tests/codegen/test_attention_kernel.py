"""A lowered model's self-attention cores run by the attention kernel of its linear libraries: softmax(q k^T) v per
head read straight from the stacked q/k/v projection (or three sources), equal to torch's SDPA to float32
rounding at any token count; calls and shapes the kernel does not take run SDPA; saved and exported models keep
it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.runtime import attention_op
from srigl_compile.runtime.registry import get_handle
from tests.models import lowered_attention_encoder

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def kernel_key():
    """A CPU linear library (any: each holds the attention function)."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(16, 16)), SRigLConfig(sparsity=0.5))
    key = lower(masked, example_inputs=torch.randn(2, 16), progress=False)[0].kernel_key
    assert get_handle(key).attention_fn is not None
    return key


def _reference(q, k, v, heads, head_dim, offsets, dtype=torch.float64):
    """SDPA on the heads at ``offsets`` in ``dtype``, back to [B, T, heads * head_dim]."""
    split = [x.to(dtype)[..., start:start + heads * head_dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)
             for x, start in zip((q, k, v), offsets)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)


def _assert_as_exact_as_torch(got, q, k, v, heads, head_dim, offsets):
    """The kernel's largest error against float64 SDPA is within 4x torch's float32 SDPA's (+ 1e-6)."""
    exact = _reference(q, k, v, heads, head_dim, offsets)
    torch_error = (_reference(q, k, v, heads, head_dim, offsets, torch.float32).double() - exact).abs().max()
    assert got.shape == exact.shape and (got.double() - exact).abs().max() <= 4 * torch_error + 1e-6


@pytest.mark.parametrize("heads, head_dim", [(1, 64), (3, 64), (2, 128)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 65, 197])  # tails of the query blocks (6) and 16- / 64-key chunks
def test_stacked_projection_output_gives_torch_s_attention(kernel_key, heads, head_dim, tokens):
    e = heads * head_dim
    for batch in (1, 3):
        qkv = torch.randn(batch, tokens, 3 * e) * 2
        got = attention_op.attention(qkv, qkv, qkv, heads, head_dim, 0, e, 2 * e, kernel_key)
        _assert_as_exact_as_torch(got, qkv, qkv, qkv, heads, head_dim, (0, e, 2 * e))


def test_separate_sources_and_other_key_counts(kernel_key):
    q, k, v = torch.randn(2, 7, 128), torch.randn(2, 130, 128), torch.randn(2, 130, 128)  # cross-attention
    _assert_as_exact_as_torch(attention_op.attention(q, k, v, 2, 64, 0, 0, 0, kernel_key), q, k, v, 2, 64,
                              (0, 0, 0))
    big = torch.randn(1, 40, 192) * 6  # (scores in the hundreds: the softmax must subtract the row's true max)
    _assert_as_exact_as_torch(attention_op.attention(big, big, big, 3, 64, 0, 0, 0, kernel_key), big, big, big, 3,
                              64, (0, 0, 0))


def test_calls_the_kernel_does_not_take_run_sdpa(kernel_key, monkeypatch):
    handle = get_handle(kernel_key)
    monkeypatch.setattr(handle, "attention_fn", lambda *args: pytest.fail("the kernel ran"))
    for q, heads, head_dim in ((torch.randn(1, 9, 96), 3, 32),  # head dim not a multiple of 64
                               (torch.randn(1, attention_op.MAX_KEYS + 1, 64), 1, 64),  # too many keys
                               (torch.randn(1, 9, 128, dtype=torch.float64), 2, 64)):  # not float32
        got = attention_op.attention(q, q, q, heads, head_dim, 0, 0, 0, kernel_key)
        torch.testing.assert_close(got.double(), _reference(q, q, q, heads, head_dim, (0, 0, 0)), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lowered_encoders_attend_in_the_kernel(batch_first, monkeypatch):
    masked, lowered, x = lowered_attention_encoder(batch_first)
    attentions = [m for m in lowered.modules() if isinstance(m, CondensedMultiheadAttention)]
    assert attentions and all(m.attention_key for m in attentions)
    calls = []
    run = attention_op._run
    monkeypatch.setattr(attention_op, "_run", lambda *args: calls.append(1) or run(*args))
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == len(attentions)
        # a padding mask: SDPA as before, same values as the masked model
        pad = torch.zeros(2, 11, dtype=torch.bool)
        pad[1, 7:] = True
        torch.testing.assert_close(lowered(x, src_key_padding_mask=pad), masked(x, src_key_padding_mask=pad),
                                   rtol=1e-5, atol=1e-5)
        assert len(calls) == len(attentions)


def test_saved_and_exported_models_keep_the_kernel(tmp_path):
    masked, lowered, x = lowered_attention_encoder(True)
    save_lowered(lowered, tmp_path / "model")
    loaded = load_lowered(tmp_path / "model")
    assert all(m.attention_key for m in loaded.modules() if isinstance(m, CondensedMultiheadAttention))
    exported = torch.export.export(lowered, (x,))
    assert any("tvm_attention" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        want = masked(x)
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
