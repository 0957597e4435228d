"""LoweredLayerNorm: ``nn.LayerNorm`` over the last dimension run by the layer-norm kernel of a lowered model's
linear library.

A lowered Linear layer's CPU library holds a layer norm besides its kernels (``codegen.glue_kernels``); a model's
layer norms call it through that layer's ``kernel_key`` (any Linear of the model on the CPU: the library is
loaded whenever the model is, ``save_lowered`` writes it). Results equal ``nn.LayerNorm``'s to float32 rounding
(``runtime.norm_op``); same parameters and state dict.

Example:
    >>> norm = LoweredLayerNorm(nn.LayerNorm(768), layer.kernel_key)     # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..runtime import norm_op  # registers torch.ops.srigl_compile.tvm_layer_norm (no TVM import)

__all__ = ["LoweredLayerNorm", "can_lower_layer_norm"]


def can_lower_layer_norm(module: nn.Module) -> bool:
    """An ``nn.LayerNorm`` the kernel computes: over the last dimension only."""
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


class LoweredLayerNorm(nn.LayerNorm):
    """``norm`` (an nn.LayerNorm that ``can_lower_layer_norm``, its parameters shared), computed by
    ``kernel_key``'s library."""

    def __init__(self, norm: nn.LayerNorm, kernel_key: str) -> None:
        if not can_lower_layer_norm(norm):
            raise ValueError(f"LoweredLayerNorm normalises over the last dimension only, got {norm}")
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.register_parameter("weight", norm.weight)  # (None without elementwise_affine or bias)
        self.register_parameter("bias", norm.bias)
        self.kernel_key = kernel_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_op.layer_norm(x, self.weight, self.bias, self.eps, self.kernel_key)
