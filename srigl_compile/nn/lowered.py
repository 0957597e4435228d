"""Lowered layers: condensed layers whose forward calls a TVM-compiled kernel through a torch custom op.

They are condensed layers (same buffers, same full-width/compact output) with the fan-in padded to a multiple
of ``K_MULTIPLE`` (zero values on the row's last index, so rows stay sorted) and a kernel key naming the compiled
kernel in ``codegen.op``'s registry. Convolutions store global im2col column indices.
"""

from __future__ import annotations

import torch

from ..codegen import op  # registers torch.ops.srigl_compile.* (no TVM import)
from .condensed import CondensedConv, CondensedLinear, index_dtype_for

__all__ = ["LoweredLinear", "LoweredConv", "pad_fan_in", "make_lowered_", "K_MULTIPLE"]

K_MULTIPLE = 8


def _eager(x: torch.Tensor) -> bool:
    """A plain tensor outside any tracer: call the kernel directly and skip ~7 us of dispatcher. Proxies, fake
    and functional tensors (fx, export, torch.compile) go through the registered operator instead."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def pad_fan_in(values: torch.Tensor, indices: torch.Tensor, multiple: int = K_MULTIPLE):
    """Pad k to a multiple of ``multiple``: zero values on each row's last index (rows stay sorted)."""
    n, k = values.shape
    extra = (-k) % multiple if k else multiple
    if extra == 0 or n == 0:
        return values.contiguous(), indices.contiguous()
    last = indices[:, -1:] if k else torch.zeros(n, 1, dtype=indices.dtype)
    return (torch.cat([values, values.new_zeros(n, extra)], dim=1).contiguous(),
            torch.cat([indices, last.expand(n, extra)], dim=1).contiguous())


class LoweredLinear(CondensedLinear):
    """A CondensedLinear running the compiled kernel (``kernel_key``); batches >= ``col_threshold`` use the
    large-batch layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_active == 0:
            return self.scatter(x.new_empty(*x.shape[:-1], 0), dim=-1)
        run = op.condensed_linear if _eager(x) else torch.ops.srigl_compile.condensed_linear
        y = run(x, self.values, self.indices, self.bias, self.kernel_key, self.col_threshold)
        return self.scatter(y, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}"


class LoweredConv(CondensedConv):
    """A CondensedConv running the compiled kernel on im2col columns (always the large-batch layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns, spatial = self.im2col(x)  # [B, C * kernel, L]
        batch, features, positions = columns.shape
        xt = columns.transpose(0, 1).reshape(features, batch * positions)
        run = op.condensed_linear_cols if _eager(xt) else torch.ops.srigl_compile.condensed_linear_cols
        yt = run(xt, self.values, self.indices, self.bias, self.kernel_key)
        y = self.scatter(yt.view(-1, batch, positions).transpose(0, 1), dim=1)
        return y.reshape(batch, y.shape[1], *spatial)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}"


def kernel_operands(layer) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(kernel input width, padded values, padded kernel indices) of a condensed layer."""
    if isinstance(layer, CondensedConv):
        width = layer.in_channels * layer.fan_in // (layer.in_channels // layer.groups)
        columns = layer.global_columns().to(index_dtype_for(width))
        values, indices = pad_fan_in(layer.values, columns)
        return width, values, indices
    values, indices = pad_fan_in(layer.values, layer.indices)
    return layer.fan_in, values, indices


@torch.no_grad()
def make_lowered_(layer, kernel_key: str, values: torch.Tensor, indices: torch.Tensor, col_threshold: int):
    """Turn a condensed layer into its lowered class in place."""
    layer.__class__ = LoweredConv if isinstance(layer, CondensedConv) else LoweredLinear
    layer.values, layer.indices = values, indices
    if layer.bias is None:
        layer.bias = torch.zeros(layer.n_active, dtype=values.dtype)
    layer.kernel_key, layer.col_threshold = kernel_key, col_threshold
    return layer
