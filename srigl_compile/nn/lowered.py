"""Lowered layers: condensed layers whose forward calls a TVM-compiled kernel (``codegen.kernel_op``).

They keep the condensed layers' buffers and full-width/compact output, with the operands packed by the kernel's
handle (fan-in padded to a multiple of 8 with zero weights on each row's last index, so rows stay sorted) and a
kernel key naming the handle in the registry. Convolutions store global im2col column indices and run the same
kernel on the [B * positions, C * kernel] rows of im2col.
"""

from __future__ import annotations

import torch

from ..codegen import kernel_op  # registers torch.ops.srigl_compile.tvm_condensed_linear (no TVM import)
from .condensed import CondensedConv, CondensedLinear, index_dtype_for

__all__ = ["LoweredLinear", "LoweredConv", "kernel_operands", "make_lowered_"]


class LoweredLinear(CondensedLinear):
    """A CondensedLinear running its compiled kernel (``kernel_key``); batches of ``col_threshold`` rows or more
    use the large-batch layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_active == 0:
            return self.scatter(x.new_empty(*x.shape[:-1], 0), dim=-1)
        y = kernel_op.condensed_linear(x, self.values, self.indices, self.bias, self.kernel_key, self.col_threshold)
        return self.scatter(y, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}"


class LoweredConv(CondensedConv):
    """A CondensedConv running its compiled kernel on im2col rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, spatial = self.im2col_rows(x)  # [B * L, C * kernel]
        batch = x.shape[0]
        y = kernel_op.condensed_linear(rows, self.values, self.indices, self.bias, self.kernel_key, self.col_threshold)
        y = self.scatter(y.view(batch, -1, y.shape[-1]).transpose(1, 2), dim=1)
        return y.reshape(batch, y.shape[1], *spatial)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}"


def kernel_operands(layer) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(kernel input width, values, kernel indices) of a condensed layer, before packing."""
    if isinstance(layer, CondensedConv):
        width = layer.in_channels * layer.fan_in // (layer.in_channels // layer.groups)
        return width, layer.values, layer.global_columns().to(index_dtype_for(width))
    return layer.fan_in, layer.values, layer.indices


@torch.no_grad()
def make_lowered_(layer, handle, col_threshold: int):
    """Turn a condensed layer into its lowered class in place, with operands packed for ``handle``."""
    _, values, indices = kernel_operands(layer)
    layer.__class__ = LoweredConv if isinstance(layer, CondensedConv) else LoweredLinear
    if layer.n_active:
        layer.values, layer.indices = handle.pack(values, indices)
    layer.kernel_key = handle.key if handle is not None else ""
    layer.col_threshold = col_threshold
    return layer
