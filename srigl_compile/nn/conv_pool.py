"""LoweredConvMaxPool: a lowered direct convolution and the max-pool that alone reads it, run band by band.

``passes/fuse_conv_pool.py`` puts one in the max-pool's place (the convolution's place becomes a ``FusedConvPlace``,
an ``nn.Identity``, so the model's own forward hands the convolution's input on to it). Eager calls on plain float32
CPU tensors run ``runtime.conv_pool_op.conv_max_pool``: per image, bands of the pool's rows, each band's convolution
rows computed into a buffer that stays in L2 and pooled from there; traced calls (compile, export) the same as the
operator ``tvm_conv_max_pool``. Anything else (fx's symbolic trace, autograd inputs, an eager input shape whose
dense form is on trial or chosen, a library whose max-pool cannot read strided images) runs the two modules one
after the other, as before the fusion: the same values either way.

Example:
    >>> fused = LoweredConvMaxPool(model.conv1, model.maxpool)       # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from ..runtime import conv_op
from ..runtime.checks import KernelDtypeError, KernelShapeError
from ..runtime.conv_geometry import output_size
from ..runtime.conv_pool_op import conv_max_pool, traced_conv_max_pool
from ..runtime.pool_op import kernel_takes, max_pool_computes
from ..runtime.registry import get_handle
from .lowered import LoweredConv, subsamples
from .lowered_guards import refuse_autograd, with_layer_name
from .pooling import LoweredMaxPool2d
from .traced_dense import traced_dense_choice

__all__ = ["LoweredConvMaxPool", "FusedConvPlace", "can_fuse_conv_pool"]


def can_fuse_conv_pool(conv: nn.Module, pool: nn.Module) -> bool:
    """A 2-d direct LoweredConv (not a strided 1x1 one, which subsamples its input first) with every filter
    active (no scatter), computing its own epilogue without a residual, and a LoweredMaxPool2d."""
    return (isinstance(conv, LoweredConv) and conv.direct and conv.dims == 2 and not subsamples(conv)
            and conv.n_active == conv.out_channels and "add" not in conv.epilogue
            and (conv.fused_epilogue or not conv.epilogue) and isinstance(pool, LoweredMaxPool2d))


class FusedConvPlace(nn.Identity):
    """What stays in a convolution's place once it runs inside the LoweredConvMaxPool that alone reads it: it
    hands its input on (the model's forward passes it to the fused module), and reads of the convolution's
    attributes (``out_channels``, ``kernel_size``...) give the fused convolution's, so a forward that reads them
    (``x.view(-1, self.conv.out_channels * 16)``, which a traced graph does not show) keeps working."""

    def __init__(self, conv: LoweredConv) -> None:
        super().__init__()
        self.__dict__["fused_conv"] = conv  # (not a submodule: its parameters belong to the fused module once)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            fused = self.__dict__.get("fused_conv")
            if fused is None:  # (while unpickling, before its state is back)
                raise
            return getattr(fused, name)


class LoweredConvMaxPool(nn.Module):
    """``pool(conv(x))``, band by band where it can (module docstring)."""

    srigl_leaf = True  # graph capture keeps it one call_module node

    def __init__(self, conv: LoweredConv, pool: LoweredMaxPool2d) -> None:
        if not can_fuse_conv_pool(conv, pool):
            raise ValueError(f"LoweredConvMaxPool fuses a direct 2-d LoweredConv with all filters active and no "
                             f"residual, and a LoweredMaxPool2d; got {type(conv).__name__} and {type(pool).__name__}")
        super().__init__()
        self.conv, self.pool = conv, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = type(x) is not torch.Tensor or torch.compiler.is_compiling()
        if not traced and torch.is_grad_enabled():
            refuse_autograd(self.conv, x)
        if not isinstance(x, torch.Tensor) or not self._bands_take(x, traced):  # (an fx Proxy is not a Tensor)
            return self.pool(self.conv(x))
        conv, pool = self.conv, self.pool
        images, kernel, stride, dilation, padding = conv._as_2d(x)  # (padding modes and "same" applied)
        pooling = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation))
        if not max_pool_computes(output_size(images.shape[2:], kernel, stride, padding, dilation), *pooling):
            return pool(conv(x))  # (the layers' own errors: the conv's, named, or torch's, from the pool)
        if traced:  # (the op's fake plans the call, with the convolution op's checks)
            return traced_conv_max_pool(images, conv.values, conv.indices, conv.bias, conv.kernel_key,
                                        (kernel, padding, dilation, stride), pooling)
        try:
            call, values = conv_op.prepare_call(images, conv.values, conv.indices, conv.bias, conv.kernel_key, kernel,
                                                padding, dilation, stride)
        except (KernelShapeError, KernelDtypeError) as err:
            raise with_layer_name(err, conv) from None
        return conv_max_pool(images, call, values, conv.bias, pooling)

    def _bands_take(self, x: torch.Tensor, traced: bool) -> bool:
        """An input the banded path runs: float32 images on the CPU, not tracked by autograd, whose shape runs the
        kernel (no dense form on trial or chosen for it; traced: chosen), from a library whose max-pool reads strided
        images."""
        if not kernel_takes(x):
            return False
        if traced:
            if traced_dense_choice(self.conv, x, None) is not None:
                return False
        elif (form := self.conv.__dict__.get("_dense_form")) is not None and (
                form.choices.get((x.shape, None)) is not False):  # (on trial, or chosen dense)
            return False
        return getattr(get_handle(self.conv.kernel_key), "pitched_pool", False)
