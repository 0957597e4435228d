"""``torch.ops.srigl_compile.tvm_layer_norm``: a lowered model's layer norm over the last dimension, run by the
``layer_norm`` glue kernel of one of its linear libraries (``codegen.glue_kernels``); ``tvm_rms_norm`` likewise
its RMS norms (``rms_norm``: y = w * (x / sqrt(mean(x^2) + eps)), Llama's RMSNorm to float32 rounding).

    tvm_layer_norm(x [..., N], weight [N]?, bias [N]?, eps, kernel_key) -> y [..., N]
    tvm_rms_norm(x [..., N], weight [N], eps, kernel_key) -> y [..., N]

Same values as ``F.layer_norm(x, (N,), weight, bias, eps)`` to float32 rounding (two-pass mean and variance).
torch's takes 102 us on ViT-B/16's 197x768 tokens inside a model on 2 cores, the kernel 43 us (12.8 ms against
2.5 ms at batch 64). ``kernel_key`` names any registered linear handle whose library holds the function (a lowered
model carries those libraries anyway, and ``save_lowered`` writes them). Inputs the kernel does not take (not
float32 on the CPU, tracked by autograd, or a library saved before the layer norm existed) run ``F.layer_norm``.

Example:
    >>> y = layer_norm(x, norm.weight, norm.bias, norm.eps, layer.kernel_key)   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import register_fake
from .registry import get_handle
from .scratch import result

__all__ = ["layer_norm", "rms_norm", "rms_norm_reference"]


def _affine(tensor: torch.Tensor | None, width: int, fill: float) -> torch.Tensor | None:
    """A float32 contiguous weight or bias of ``width`` (``fill`` where the layer has none); None if it cannot be."""
    if tensor is None:
        return torch.full((width,), fill)
    if tensor.dtype != torch.float32 or not tensor.is_cpu or tensor.shape != (width,) or (
            tensor.requires_grad and torch.is_grad_enabled()):
        return None
    return tensor.contiguous()


def _run(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
         kernel_key: str) -> torch.Tensor:
    norm_fn = getattr(get_handle(kernel_key), "layer_norm_fn", None)
    width = x.shape[-1] if x.dim() else 0
    affine = (_affine(weight, width, 1.0), _affine(bias, width, 0.0))
    if (norm_fn is None or x.dim() == 0 or x.numel() == 0 or not x.is_cpu or x.dtype != torch.float32
            or (x.requires_grad and torch.is_grad_enabled()) or affine[0] is None or affine[1] is None):
        return F.layer_norm(x, (width,), weight, bias, eps)  # torch's result, or its error
    rows = x.reshape(-1, width).contiguous()
    y = result(tuple(rows.shape))
    norm_fn(rows, *affine, y, eps)
    return y.view(x.shape)


_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, str kernel_key) -> Tensor")
_LIB.impl("tvm_layer_norm", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_layer_norm", _LIB)
def _tvm_layer_norm_fake(x, weight, bias, eps, kernel_key):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               kernel_key: str) -> torch.Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`` through the layer-norm kernel of ``kernel_key``'s
    library. Plain eager tensors skip the dispatcher, tracers go through ``torch.ops``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return _run(x, weight, bias, eps, kernel_key)
    return torch.ops.srigl_compile.tvm_layer_norm(x, weight, bias, eps, kernel_key)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What the kernel computes, in torch: Llama's RMSNorm (float32 statistics, the result in x's dtype, scaled)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _run_rms(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel_key: str) -> torch.Tensor:
    norm_fn = getattr(get_handle(kernel_key), "rms_norm_fn", None)
    width = x.shape[-1] if x.dim() else 0
    scale = _affine(weight, width, 1.0)
    if (norm_fn is None or x.dim() == 0 or x.numel() == 0 or not x.is_cpu or x.dtype != torch.float32
            or (x.requires_grad and torch.is_grad_enabled()) or scale is None):
        return rms_norm_reference(x, weight, eps)
    rows = x.reshape(-1, width).contiguous()
    y = result(tuple(rows.shape))
    norm_fn(rows, scale, y, eps)
    return y.view(x.shape)


_LIB.define("tvm_rms_norm(Tensor x, Tensor weight, float eps, str kernel_key) -> Tensor")
_LIB.impl("tvm_rms_norm", _run_rms, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_rms_norm", _LIB)
def _tvm_rms_norm_fake(x, weight, eps, kernel_key):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel_key: str) -> torch.Tensor:
    """``rms_norm_reference(x, weight, eps)`` through the RMS-norm kernel of ``kernel_key``'s library (float32 CPU
    rows; anything else runs the reference). Plain eager tensors skip the dispatcher, tracers go through
    ``torch.ops``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return _run_rms(x, weight, eps, kernel_key)
    return torch.ops.srigl_compile.tvm_rms_norm(x, weight, eps, kernel_key)
