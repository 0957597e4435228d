"""A Llama-shaped decoder in plain torch whose decode step can be captured in a CUDA graph.

Llama's blocks (RMSNorm, rotary q/k, multi-head attention over a key/value cache, SwiGLU MLP; projections without
bias) at any size: ``DecoderShape.llama_7b(layers)`` is Llama-2-7B's (hidden 4096, MLP 11008, 32 heads, vocabulary
32000). Written here rather than taken from transformers because the GPU machine has no network and the bundle no
room for transformers' wheels, and because every shape must stay static for a CUDA graph: the key/value cache is a
tensor passed in, written in place at ``position`` (a tensor, so a replay can advance it), and attention always
spans the whole cache with positions past ``position`` masked out.

    step(model, cache, tokens, position)   # tokens [B, T] at positions position..position+T-1 -> logits [B, T, V]
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_len: int

    @classmethod
    def llama_7b(cls, layers: int, max_len: int = 256) -> DecoderShape:
        return cls(hidden=4096, intermediate=11008, layers=layers, heads=32, vocab=32000, max_len=max_len)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def rotary_tables(shape: DecoderShape, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim] of Llama's rotary embedding (the two halves of a head rotate together)."""
    inverse = 1.0 / base ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
    angles = torch.outer(torch.arange(shape.max_len, dtype=torch.float64), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class Block(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        h, m = shape.hidden, shape.intermediate
        self.heads, self.head_dim = shape.heads, shape.head_dim
        self.attention_norm, self.mlp_norm = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(h, m, bias=False), nn.Linear(h, m, bias=False)
        self.down_proj = nn.Linear(m, h, bias=False)

    def forward(self, x, keys, values, positions, visible, cos, sin):
        batch, length, _ = x.shape
        y = self.attention_norm(x)
        q, k, v = (proj(y).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys.index_copy_(2, positions, k.to(keys.dtype))  # (the cache: [B, heads, max_len, head_dim])
        values.index_copy_(2, positions, v.to(values.dtype))
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Decoder(nn.Module):
    """Token embedding, ``shape.layers`` blocks, a final RMSNorm and an untied output head."""

    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norm = nn.RMSNorm(shape.hidden, eps=1e-5)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)
        cos, sin = rotary_tables(shape)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] at positions position..position+T-1 (position: a long tensor of one element); cache
        [layers, 2, B, heads, max_len, head_dim], written in place. Returns logits [B, T, vocab]."""
        length = tokens.shape[1]
        positions = position + torch.arange(length, device=tokens.device)
        # query t sees cache slots 0..positions[t]: a [T, max_len] mask, the same shape at every step
        visible = torch.arange(self.shape.max_len, device=tokens.device)[None, :] <= positions[:, None]
        cos, sin = self.cos[positions].to(self.embed.weight.dtype), self.sin[positions].to(self.embed.weight.dtype)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i, 0], cache[i, 1], positions, visible, cos, sin)
        return self.lm_head(self.norm(x))


def new_cache(shape: DecoderShape, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros(shape.layers, 2, batch, shape.heads, shape.max_len, shape.head_dim, dtype=dtype,
                       device=device)


def example_inputs(shape: DecoderShape, batch: int = 2, length: int = 3):
    """What sparsify / lower capture the decoder with (any batch and length: the graph is shape-generic)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, shape.vocab, (batch, length), generator=generator), torch.zeros(1, dtype=torch.long),
            new_cache(shape, batch, torch.float32, "cpu"))


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache: torch.Tensor) -> torch.Tensor:
    """Greedy decoding, one token a step after the prompt: the generated tokens [B, new_tokens]."""
    position = torch.zeros(1, dtype=torch.long, device=prompt.device)
    logits = model(prompt, position, cache)
    position += prompt.shape[1]
    token = logits[:, -1:].argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
        token = model(token, position, cache)[:, -1:].argmax(-1)
        position += 1
        out.append(token)
    return torch.cat(out, dim=1)
