"""FuseProjectionsPass: the q, k and v projections of self-attention as one condensed layer, one kernel call.

A ``CondensedMultiheadAttention`` holds its packed ``in_proj`` as three layers (``nn.condensed_attention``); in
self-attention all three read the same input, so three kernel calls pack and read it three times. The self-attention
of torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (their ``self_attn``, which torch always
calls with query, key and value the same tensor) gets one stacked layer instead (``fuse_projections_``).

Contract.
    requires: condensed layers, before CompileKernelsPass.
    ensures:  each such self_attn whose q / k / v projections are CondensedLinear layers of one fan-in, k, dtypes
              and bias presence (full width, no epilogue) computes them with ``qkv_proj``; its outputs are the same
              bit for bit (every row sums the same products in the same order). Other attention (cross-attention,
              attention called by a model's own code) keeps its three layers.
    preserves: nothing (the graph and the layer names change).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..nn.condensed_attention import CondensedMultiheadAttention
from ..nn.transformer_layers import ResidualEncoderLayer
from .analysis import Analyses
from .base import Pass, PassResult

__all__ = ["FuseProjectionsPass"]

log = logging.getLogger(__name__)

# self_attn(x, x, x)
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, ResidualEncoderLayer, nn.TransformerDecoderLayer)


class FuseProjectionsPass(Pass):
    """Stack each transformer layer's self-attention projections into one layer (see the module's contract)."""

    def __init__(self) -> None:
        self.fused: list[str] = []  # names of the attention modules fused

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        self.fused = []
        for name, parent in model.named_modules():
            attention = getattr(parent, "self_attn", None)
            if type(parent) in _TRANSFORMER_LAYERS and isinstance(attention, CondensedMultiheadAttention) \
                    and attention.fuse_projections_():
                self.fused.append(f"{name}.self_attn" if name else "self_attn")
        if self.fused:
            log.info("stacked the q / k / v projections of %d self-attention modules", len(self.fused))
        return PassResult(model, modified=bool(self.fused))
