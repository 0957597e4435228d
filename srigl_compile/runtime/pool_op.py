"""``torch.ops.srigl_compile.tvm_max_pool2d`` and ``tvm_global_avg_pool2d``: a lowered model's max-pooling and
global average pooling, run by the ``max_pool`` and ``global_avg_pool`` glue kernels of one of its convolution
libraries (``codegen.glue_kernels``).

    tvm_max_pool2d(x [B, C, H, W], kernel_key, kernel_size, stride, padding, dilation) -> y [B, C, OH, OW]
    tvm_global_avg_pool2d(x [B, C, H, W], kernel_key) -> y [B, C, 1, 1]

Same result as ``F.max_pool2d`` (floor mode, -inf padding, a NaN in a window wins), read from images with any
row pitch and channel stride as they are (``conv_geometry.pitched_stride``: a convolution's uncropped output grid,
``passes/planar_layout.py``); torch's NCHW max-pool takes 3.1 ms on a ResNet-50 stem's 64x112x112 on 2 cores, the
kernel ~0.3-0.4 ms. ``kernel_key`` names any registered convolution handle whose library holds the function (a
lowered model carries those libraries anyway, and ``save_lowered`` writes them). Inputs the kernel does not take
(not float32 on the CPU, tracked by autograd, or a library saved before the pool existed) run ``F.max_pool2d``: the
same values.

The global average pool equals ``F.adaptive_avg_pool2d(x, 1)`` to float32 rounding (its sums run in another
order). It is here for speed in a whole forward, not for its own work (2048 x 7 x 7 floats at ResNet-50's head):
torch's ``mean`` there took 0.37 ms in a replayed forward (``nn.cpu_graph``), against ~45 us right after a kernel
in a loop, because torch's OpenMP threads sleep through the ~20 ms of TVM kernels before it
(``OMP_WAIT_POLICY=PASSIVE``) and must be woken; TVM's pool is the one the kernels just used. It reads planar
images as they are (``conv_geometry.planar_stride``).

Example:
    >>> y = max_pool2d(x, layer.kernel_key, (3, 3), (2, 2), (1, 1), (1, 1))   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import register_fake
from .conv_geometry import output_size, pitched_stride, planar_stride
from .registry import get_handle
from .scratch import result

__all__ = ["max_pool2d", "global_avg_pool2d", "max_pool_computes", "kernel_takes"]


def kernel_takes(x: torch.Tensor) -> bool:
    """Inputs a pool kernel computes: float32 images [B, C, H, W] on the CPU that autograd does not track."""
    return (x.dim() == 4 and x.is_cpu and x.dtype == torch.float32
            and not (x.requires_grad and torch.is_grad_enabled()))


def max_pool_computes(size, kernel_size, stride, padding, dilation) -> bool:
    """Whether the max-pool kernel computes these settings (pairs) on images of ``size`` as torch does: a kernel,
    stride and dilation of at least 1, padding from 0 to half the kernel, and an output pixel. Anything else goes
    to ``F.max_pool2d``, which raises its own error."""
    if min(*kernel_size, *stride, *dilation) < 1 or min(padding) < 0:
        return False
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        return False
    return min(output_size(size, kernel_size, stride, padding, dilation)) >= 1


def _run(x: torch.Tensor, kernel_key: str, kernel_size, stride, padding, dilation) -> torch.Tensor:
    handle = get_handle(kernel_key)
    pool_fn = getattr(handle, "max_pool_fn", None)
    if pool_fn is None or not kernel_takes(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation)
    if x.numel() == 0 or not max_pool_computes(x.shape[2:], kernel_size, stride, padding, dilation):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation)  # torch's result, or its error
    out = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    batch, channels, height, width = x.shape
    strides = pitched_stride(x) if getattr(handle, "pitched_pool", False) else None
    if strides is None:  # (a library saved before its max-pool took strided images: contiguous ones)
        x, strides = x.contiguous(), (height * width, width)
    y = result((batch, channels, *out))
    pool_fn(x.as_strided((batch * channels, height, width), (*strides, 1)), y.view(batch * channels, *out),
            *kernel_size, *stride, *padding, *dilation)
    return y


_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_max_pool2d(Tensor x, str kernel_key, int[] kernel_size, int[] stride, int[] padding, "
            "int[] dilation) -> Tensor")
_LIB.impl("tvm_max_pool2d", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_max_pool2d", _LIB)
def _tvm_max_pool2d_fake(x, kernel_key, kernel_size, stride, padding, dilation):
    return x.new_empty(*x.shape[:2], *output_size(x.shape[2:], kernel_size, stride, padding, dilation))


def max_pool2d(x: torch.Tensor, kernel_key: str, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation)`` (pairs; floor mode) through the pool kernel of
    ``kernel_key``'s library. Plain eager tensors skip the dispatcher, tracers go through ``torch.ops``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return _run(x, kernel_key, kernel_size, stride, padding, dilation)
    return torch.ops.srigl_compile.tvm_max_pool2d(x, kernel_key, list(kernel_size), list(stride), list(padding),
                                                  list(dilation))


def _run_global_avg(x: torch.Tensor, kernel_key: str) -> torch.Tensor:
    pool_fn = getattr(get_handle(kernel_key), "global_avg_pool_fn", None)
    if pool_fn is None or not kernel_takes(x) or x.numel() == 0:
        return F.adaptive_avg_pool2d(x, 1)  # torch's result, or its error
    batch, channels, height, width = x.shape
    plane = planar_stride(x)
    if plane is None:
        x, plane = x.contiguous(), height * width
    y = result((batch, channels, 1, 1))
    pool_fn(x.as_strided((batch * channels, height * width), (plane, 1)), y.view(batch * channels))
    return y


_LIB.define("tvm_global_avg_pool2d(Tensor x, str kernel_key) -> Tensor")
_LIB.impl("tvm_global_avg_pool2d", _run_global_avg, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_global_avg_pool2d", _LIB)
def _tvm_global_avg_pool2d_fake(x, kernel_key):
    return x.new_empty(*x.shape[:2], 1, 1)


def global_avg_pool2d(x: torch.Tensor, kernel_key: str) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, 1)`` through the global average pool kernel of ``kernel_key``'s library. Plain
    eager tensors skip the dispatcher, tracers go through ``torch.ops``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return _run_global_avg(x, kernel_key)
    return torch.ops.srigl_compile.tvm_global_avg_pool2d(x, kernel_key)
