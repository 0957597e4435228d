"""``torch.ops.srigl_compile.tvm_max_pool2d``: a lowered model's max-pooling, run by the ``max_pool`` glue kernel
of one of its convolution libraries (``codegen.glue_kernels``).

    tvm_max_pool2d(x [B, C, H, W], kernel_key, kernel_size, stride, padding, dilation) -> y [B, C, OH, OW]

Same result as ``F.max_pool2d`` (floor mode, -inf padding, a NaN in a window wins); torch's NCHW max-pool takes
3.1 ms on a ResNet-50 stem's 64x112x112 on 2 cores, the kernel ~0.4 ms. ``kernel_key`` names any registered
convolution handle whose library holds the function (a lowered model carries those libraries anyway, and
``save_lowered`` writes them). Inputs the kernel does not take (not float32 on the CPU, tracked by autograd, or a
library saved before the pool existed) run ``F.max_pool2d``: the same values.

Example:
    >>> y = max_pool2d(x, layer.kernel_key, (3, 3), (2, 2), (1, 1), (1, 1))   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_geometry import output_size
from .registry import get_handle
from .scratch import result

__all__ = ["max_pool2d"]


def _run(x: torch.Tensor, kernel_key: str, kernel_size, stride, padding, dilation) -> torch.Tensor:
    pool_fn = getattr(get_handle(kernel_key), "max_pool_fn", None)
    if (pool_fn is None or x.dim() != 4 or not x.is_cpu or x.dtype != torch.float32
            or (x.requires_grad and torch.is_grad_enabled())):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation)
    out = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    if min(out) < 1 or x.numel() == 0 or any(2 * p > k for p, k in zip(padding, kernel_size)):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation)  # torch's result, or its error
    batch, channels, height, width = x.shape
    y = result((batch, channels, *out))
    pool_fn(x.contiguous().view(batch * channels, height, width), y.view(batch * channels, *out), *kernel_size,
            *stride, *padding, *dilation)
    return y


_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_max_pool2d(Tensor x, str kernel_key, int[] kernel_size, int[] stride, int[] padding, "
            "int[] dilation) -> Tensor")
_LIB.impl("tvm_max_pool2d", _run, "CompositeExplicitAutograd")


@torch.library.register_fake("srigl_compile::tvm_max_pool2d", lib=_LIB)
def _tvm_max_pool2d_fake(x, kernel_key, kernel_size, stride, padding, dilation):
    return x.new_empty(*x.shape[:2], *output_size(x.shape[2:], kernel_size, stride, padding, dilation))


def max_pool2d(x: torch.Tensor, kernel_key: str, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation)`` (pairs; floor mode) through the pool kernel of
    ``kernel_key``'s library. Plain eager tensors skip the dispatcher, tracers go through ``torch.ops``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return _run(x, kernel_key, kernel_size, stride, padding, dilation)
    return torch.ops.srigl_compile.tvm_max_pool2d(x, kernel_key, list(kernel_size), list(stride), list(padding),
                                                  list(dilation))
