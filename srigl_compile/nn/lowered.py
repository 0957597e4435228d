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

__all__ = ["LoweredLinear", "LoweredConv", "kernel_operands", "make_lowered_", "fill_ablated_rows_"]


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
def fill_ablated_rows_(layer, max_fraction: float = 0.25) -> bool:
    """Give the ablated neurons of a full-width condensed layer zero-weight rows (their bias stays what they
    output), so the kernel writes the whole width and no scatter follows: scattering [B, n_active] into
    [B, n_out] along the last dim cost more than the kernel (3 ms against 0.4 at batch 256, 3072 outputs).
    Only when at most ``max_fraction`` of the neurons are ablated (beyond that the zero rows cost more).

    Returns whether the layer changed; its outputs do not.
    """
    missing = layer.n_out - layer.n_active
    if layer.compact or layer.n_active == 0 or missing == 0 or missing > max_fraction * layer.n_out:
        return False
    values = layer.values.new_zeros(layer.n_out, layer.k)
    indices = layer.indices.new_zeros(layer.n_out, layer.k)
    values[layer.active], indices[layer.active] = layer.values, layer.indices
    if layer.bias is not None:
        bias = layer.full_bias.clone()
        bias[layer.active] = layer.bias
        layer.bias = bias
    layer.values, layer.indices = values, indices
    layer.active = torch.arange(layer.n_out, device=layer.active.device)
    if isinstance(layer, CondensedConv):
        layer.column_offsets = layer.active // (layer.out_channels // layer.groups) * layer.fan_in
    return True


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
