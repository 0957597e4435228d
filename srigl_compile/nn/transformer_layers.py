"""torch's TransformerEncoderLayer with its residual adds computed by its layers' kernels.

``nn.TransformerEncoderLayer.forward`` adds each block's output to its input as a torch op: 24 adds in ViT-B/16,
each reading two activations and writing a third. ``FuseEpiloguePass`` gives such a layer this class when its
``linear2`` (and, batch_first, its condensed self-attention's ``out_proj``) can take an "add" epilogue: the layer's
kernel then adds the block's input as it writes its output tile. Same parameters, state dict and outputs
(``isinstance`` still holds); the forward is torch's (norm_first or not, masks, is_causal) with the two adds moved
into the layers.

Example:
    >>> layer = nn.TransformerEncoderLayer(16, 2, batch_first=True).eval()     # doctest: +SKIP
    >>> layer.linear2.set_epilogue_("add"); layer.__class__ = ResidualEncoderLayer  # (the pass does this)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResidualEncoderLayer", "adds_residual"]


def adds_residual(layer: nn.Module | None) -> bool:
    """Whether a (condensed) layer adds a residual to its output: its epilogue has an add."""
    return "add" in getattr(layer, "epilogue", "")


class ResidualEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` whose ``linear2`` adds the feed-forward block's input and whose
    self-attention (``out_proj``), where its epilogue has an add, the attention block's input."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # (as torch's forward: masks in the input's float type; no native fast path, the layers are condensed)
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = self._attention_plus(self.norm1(x), x, src_mask, src_key_padding_mask, is_causal)
            return self._feed_forward_plus(self.norm2(x), x)
        x = self.norm1(self._attention_plus(x, x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(self._feed_forward_plus(x, x))

    def _attention_plus(self, x, residual, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        """residual + dropout1(self-attention of x)."""
        attention = self.self_attn
        if not adds_residual(getattr(attention, "out_proj", None)):
            return residual + self._sa_block(x, attn_mask, key_padding_mask, is_causal=is_causal)
        fused = not (self.training and self.dropout1.p)  # (dropout comes before the add: then torch adds)
        out = attention(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                        is_causal=is_causal, residual=residual if fused else torch.zeros_like(residual))[0]
        return out if fused else residual + self.dropout1(out)

    def _feed_forward_plus(self, x, residual) -> torch.Tensor:
        """residual + dropout2(linear2(dropout(activation(linear1(x)))))."""
        if not adds_residual(self.linear2):
            return residual + self._ff_block(x)
        hidden = self.dropout(self.activation(self.linear1(x)))
        if self.training and self.dropout2.p:
            return residual + self.dropout2(self.linear2(hidden, residual=torch.zeros_like(residual)))
        return self.linear2(hidden, residual=residual)
