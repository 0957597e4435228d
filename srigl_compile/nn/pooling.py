"""LoweredMaxPool2d and LoweredGlobalAvgPool2d: ``nn.MaxPool2d`` and ``nn.AdaptiveAvgPool2d(1)`` run by the
pooling kernels of a lowered model's convolution library.

A lowered convolution's CPU library holds TIR helpers besides its kernel (``codegen.glue_kernels``), the max-pool
among them; a pooling layer of the same model calls it through that convolution's ``kernel_key`` (any direct
CPU convolution of the model: the library is loaded whenever the model is, ``save_lowered`` writes it). Results
equal ``nn.MaxPool2d``'s (``runtime.pool_op``); the ResNet stem's 3x3/2 pool runs ~7x faster. The global average
pool (a CNN's head) equals ``nn.AdaptiveAvgPool2d(1)``'s to float32 rounding; it saves waking torch's threads.

Example:
    >>> pool = LoweredMaxPool2d(nn.MaxPool2d(3, 2, 1), conv.kernel_key)   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from ..runtime import pool_op  # registers torch.ops.srigl_compile.tvm_max_pool2d (no TVM import)

__all__ = ["LoweredMaxPool2d", "can_lower_max_pool", "LoweredGlobalAvgPool2d", "can_lower_global_avg_pool"]


def can_lower_max_pool(module: nn.Module) -> bool:
    """An ``nn.MaxPool2d`` the kernel computes: floor mode, no indices returned."""
    return type(module) is nn.MaxPool2d and not module.return_indices and not module.ceil_mode


class LoweredMaxPool2d(nn.MaxPool2d):
    """``pool`` (an nn.MaxPool2d that ``can_lower_max_pool``), computed by ``kernel_key``'s library."""

    srigl_leaf = True  # graph capture keeps it one call_module node (``passes/planar_layout.py`` looks for it)

    def __init__(self, pool: nn.MaxPool2d, kernel_key: str) -> None:
        if not can_lower_max_pool(pool):
            raise ValueError(f"LoweredMaxPool2d computes nn.MaxPool2d in floor mode without indices, got {pool}")
        super().__init__(pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        self.kernel_key = kernel_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched [C, H, W] (an fx Proxy is taken as batched)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return pool_op.max_pool2d(x, self.kernel_key, _pair(self.kernel_size), _pair(self.stride),
                                  _pair(self.padding), _pair(self.dilation))


def can_lower_global_avg_pool(module: nn.Module) -> bool:
    """An ``nn.AdaptiveAvgPool2d`` to a 1 x 1 output (a global average pool)."""
    return type(module) is nn.AdaptiveAvgPool2d and _pair(module.output_size) == (1, 1)


class LoweredGlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``pool`` (an nn.AdaptiveAvgPool2d that ``can_lower_global_avg_pool``), computed by ``kernel_key``'s library."""

    srigl_leaf = True  # (as LoweredMaxPool2d)

    def __init__(self, pool: nn.AdaptiveAvgPool2d, kernel_key: str) -> None:
        if not can_lower_global_avg_pool(pool):
            raise ValueError(f"LoweredGlobalAvgPool2d computes nn.AdaptiveAvgPool2d to a 1 x 1 output, got {pool}")
        super().__init__(pool.output_size)
        self.kernel_key = kernel_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched [C, H, W] (an fx Proxy is taken as batched)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return pool_op.global_avg_pool2d(x, self.kernel_key)
