"""CondensedMultiheadAttention: nn.MultiheadAttention with its projections as (condensed) layers of their own.

``nn.MultiheadAttention`` feeds its packed ``in_proj_weight`` to a fused functional, so a condensed projection
cannot slot into it. This module splits the packed projection into q / k / v layers (each a ``CondensedLinear``
when the projection was sparse, else a dense ``nn.Linear``) and computes attention with
``scaled_dot_product_attention`` (or an explicit softmax when attention weights are requested). It accepts the
same call as ``nn.MultiheadAttention.forward`` and returns the same ``(output, weights)`` pair; dropout is
inference-only (this module serves condensed inference).

``fuse_projections_()`` turns the three condensed projections back into one layer, ``qkv_proj`` (their rows
stacked): for self-attention (query, key and value the same tensor) one kernel call then reads the input once
instead of three times (ViT-B/16's 768 -> 3 x 768 at 197 tokens: 911 -> 751 us on 2 cores).

Example:
    >>> import torch.nn as nn
    >>> mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    >>> cond = CondensedMultiheadAttention.from_attention(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(cond(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LayerError
from ..runtime import attention_op  # registers torch.ops.srigl_compile.tvm_attention (no TVM import)
from .condensed import CondensedLinear, condensed_arrays

__all__ = ["CondensedMultiheadAttention"]


def _projection(weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None, name: str) -> nn.Module:
    """A CondensedLinear for a masked slice of a packed projection, else a dense Linear."""
    out_features, in_features = weight.shape
    if mask is None:
        layer = nn.Linear(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer
    active, values, indices = condensed_arrays(weight, mask, name)
    return CondensedLinear(in_features, out_features, active, values, indices, bias)


class CondensedMultiheadAttention(nn.Module):
    """Multi-head attention over separate q / k / v / out projection modules (see module docstring)."""

    # TransformerEncoder(Layer) inspect these before taking their fused fast path (which reads in_proj_weight);
    # with no packed projection, they must take the module path that calls our forward.
    _qkv_same_embed_dim = False
    in_proj_bias = None
    # A lowered model's CPU library holding the attention kernel (``passes.lower_glue.LowerAttentionPass``): calls
    # without mask, causality or weights run softmax(q k^T) v there (``runtime.attention_op``); "" for torch's SDPA.
    attention_key = ""

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, q_proj: nn.Module, k_proj: nn.Module,
                 v_proj: nn.Module, out_proj: nn.Module) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.register_module("qkv_proj", None)  # the stacked projection of ``fuse_projections_`` (then q/k/v None)

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, name: str = "attention") -> CondensedMultiheadAttention:
        """Build from an nn.MultiheadAttention (masked or dense); masked projections become CondensedLinear."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise LayerError(f"{name}: add_bias_kv / add_zero_attn attention has no condensed form")
        e = mha.embed_dim
        bias = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        projections = []
        for i, (param, child) in enumerate((("q_proj_weight", "q_proj"), ("k_proj_weight", "k_proj"),
                                            ("v_proj_weight", "v_proj"))):
            rows = slice(i * e, (i + 1) * e)
            packed = mha._modules.get("in_proj") if mha._qkv_same_embed_dim else mha._modules.get(child)
            if mha._qkv_same_embed_dim:
                weight = (packed.weight if packed is not None else mha.in_proj_weight).detach()[rows]
                mask = packed.mask[rows] if packed is not None else None
            else:
                weight = (packed.weight if packed is not None else getattr(mha, param)).detach()
                mask = packed.mask if packed is not None else None
            projections.append(_projection(weight, mask, None if bias is None else bias[rows], f"{name}.{child}"))
        out = mha.out_proj
        out_mask = getattr(out, "mask", None)
        out_proj = _projection(out.weight.detach(), out_mask, None if out.bias is None else out.bias.detach(),
                               f"{name}.out_proj")
        return cls(e, mha.num_heads, mha.batch_first, *projections, out_proj)

    def fuse_projections_(self) -> bool:
        """Replace q_proj, k_proj and v_proj by one CondensedLinear ``qkv_proj`` computing all three (rows stacked;
        outputs the same bit for bit: every row sums the same products in the same order), when they are
        condensed layers of one fan-in, k, dtypes and bias presence, full width and without epilogues. Whether it
        fused. Calls whose query, key and value differ run it on each (three times the work): fuse only attention
        that is called as self-attention."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self._modules.get("qkv_proj") is not None or any(type(layer) is not CondensedLinear for layer in layers):
            return False
        first = layers[0]
        if any(layer.in_features != first.in_features or layer.values.shape[1] != first.values.shape[1]
               or layer.values.dtype != first.values.dtype or layer.indices.dtype != first.indices.dtype
               or (layer.bias is None) != (first.bias is None) or layer.compact or layer.epilogue
               for layer in layers):
            return False
        starts = [0, first.out_features, first.out_features + self.k_proj.out_features]
        active = torch.cat([layer.active + start for layer, start in zip(layers, starts)])
        bias = torch.cat([layer.full_bias for layer in layers]) if first.bias is not None else None
        self.qkv_proj = CondensedLinear(first.in_features, starts[2] + self.v_proj.out_features, active,
                                        torch.cat([layer.values for layer in layers]),
                                        torch.cat([layer.indices for layer in layers]), bias)
        self.q_proj = self.k_proj = self.v_proj = None
        return True

    def _projected(self, query, key, value, same: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """(q, k, v sources, the column each starts at): the stacked projection's one output three times when
        ``same`` (self-attention), else each projection's own."""
        stacked = self._modules.get("qkv_proj")  # (modules saved before it existed have none)
        if stacked is None:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value), (0, 0, 0)
        e = self.embed_dim
        if same:
            qkv = stacked(query)
            return qkv, qkv, qkv, (0, e, 2 * e)
        q, k, v = (stacked(x) for x in (query, key, value))
        return q, k, v, (0, e, 2 * e)

    def _projections(self, query, key, value, same: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *sources, offsets = self._projected(query, key, value, same)
        return tuple(x[..., start:start + self.embed_dim] for x, start in zip(sources, offsets))

    def _unbatched(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal, residual):
        dim = 0 if self.batch_first else 1
        batched = {id(t): t.unsqueeze(dim) for t in (query, key, value)}  # (self-attention stays one tensor)
        out, weights = self.forward(
            batched[id(query)], batched[id(key)], batched[id(value)],
            None if key_padding_mask is None else key_padding_mask.unsqueeze(0), need_weights, attn_mask,
            average_attn_weights, is_causal, None if residual is None else residual.unsqueeze(dim))
        return out.squeeze(dim), None if weights is None else weights.squeeze(0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _additive_mask(self, attn_mask, key_padding_mask, q: torch.Tensor, s: int):
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else \
                torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
            if mask.dim() == 3:  # [B * heads, T, S]
                mask = mask.reshape(q.shape[0], self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            pad = key_padding_mask if key_padding_mask.dtype != torch.bool else \
                torch.zeros(key_padding_mask.shape, dtype=q.dtype).masked_fill(key_padding_mask, float("-inf"))
            pad = pad.reshape(q.shape[0], 1, 1, s)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, residual=None):
        """nn.MultiheadAttention's call; ``residual`` (shaped like the output) is added to it by ``out_proj``
        (whose epilogue then has an add: ``nn.transformer_layers``)."""
        if query.dim() == 2:  # unbatched [T, E], as nn.MultiheadAttention takes it: a batch of one
            return self._unbatched(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal, residual)
        same = query is key and key is value  # (before the transposes below make three views)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self.attention_key and not need_weights and attn_mask is None and key_padding_mask is None \
                and not is_causal:
            *sources, offsets = self._projected(query, key, value, same)
            out = attention_op.attention(*sources, self.num_heads, self.head_dim, *offsets, self.attention_key)
            return self._finish(out, residual), None
        q, k, v = (self._heads(x) for x in self._projections(query, key, value, same))
        mask = self._additive_mask(attn_mask, key_padding_mask, q, k.shape[2])
        causal = is_causal and mask is None
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if causal:
                scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self._finish(out, residual), weights

    def _finish(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The out projection of the heads' output [B, T, E] (adding ``residual``), in the caller's layout."""
        if residual is None:
            out = self.out_proj(out)
        else:
            out = self.out_proj(out, residual=residual if self.batch_first else residual.transpose(0, 1))
        return out if self.batch_first else out.transpose(0, 1)
