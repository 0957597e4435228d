"""The GPU model benchmark's Llama-shaped decoder (benchmarks/gpu_decoder.py): its key/value cache and position
mask, which a CUDA graph replays with static shapes, compute what attention over the whole sequence computes."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu_decoder import Decoder, DecoderShape, greedy, new_cache, rotary_tables, rotate  # noqa: E402

SHAPE = DecoderShape(hidden=32, intermediate=48, layers=2, heads=4, vocab=50, max_len=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(SHAPE).eval()


def reference_logits(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder written out without a cache: causal attention over the sequence, positions 0..T-1."""
    batch, length = tokens.shape
    cos, sin = (t[:length] for t in rotary_tables(SHAPE))
    x = model.embed(tokens)
    for block in model.blocks:
        y = block.attention_norm(x)
        q, k, v = (p(y).view(batch, length, SHAPE.heads, SHAPE.head_dim).transpose(1, 2)
                   for p in (block.q_proj, block.k_proj, block.v_proj))
        scores = rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-1, -2) / SHAPE.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        attended = scores.softmax(-1) @ v
        x = x + block.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        y = block.mlp_norm(x)
        x = x + block.down_proj(F.silu(block.gate_proj(y)) * block.up_proj(y))
    return model.lm_head(model.norm(x))


@torch.no_grad()
def test_a_whole_prompt_and_one_token_at_a_time_both_match_causal_attention(model):
    tokens = torch.randint(0, SHAPE.vocab, (3, 7), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(model, tokens)
    whole = model(tokens, torch.zeros(1, dtype=torch.long), new_cache(SHAPE, 3, torch.float32, "cpu"))
    cache = new_cache(SHAPE, 3, torch.float32, "cpu")
    stepped = torch.cat([model(tokens[:, t:t + 1], torch.tensor([t]), cache) for t in range(7)], dim=1)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_slots_past_the_position_are_never_read(model):
    """A replayed step attends over the whole cache: slots not yet written must be masked out, not just zero."""
    tokens = torch.randint(0, SHAPE.vocab, (2, 4), generator=torch.Generator().manual_seed(2))
    clean = new_cache(SHAPE, 2, torch.float32, "cpu")
    dirty = torch.randn_like(clean) * 100
    position = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(model(tokens, position, dirty), model(tokens, position, clean))


def test_greedy_decoding_extends_the_prompt_with_the_reference_argmax(model):
    prompt = torch.randint(0, SHAPE.vocab, (2, 3), generator=torch.Generator().manual_seed(3))
    generated = greedy(model, prompt, 4, new_cache(SHAPE, 2, torch.float32, "cpu"))
    sequence = prompt
    with torch.no_grad():
        for _ in range(4):
            sequence = torch.cat([sequence, reference_logits(model, sequence)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence[:, 3:])
