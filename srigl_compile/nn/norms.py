"""LoweredLayerNorm: ``nn.LayerNorm`` over the last dimension run by the layer-norm kernel of a lowered model's
linear library; LoweredRMSNorm: an RMS norm (torch's ``nn.RMSNorm``, Llama-family ``*RMSNorm`` modules, Gemma's
with its 1 + weight) run by the RMS-norm kernel of one.

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

__all__ = ["LoweredLayerNorm", "can_lower_layer_norm", "LoweredRMSNorm", "rms_norm_form"]


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


_EPS_NAMES = ("variance_epsilon", "eps")  # (Llama-family modules, torch's nn.RMSNorm and T5's)


def rms_norm_form(module: nn.Module) -> tuple[float, float] | None:
    """(eps, offset) where ``module`` computes ``(offset + weight) * (x / sqrt(mean(x^2) + eps))`` over the last
    dimension (offset 1: Gemma's), else None. Read from what the module does, not its class name: a module with one
    1-d ``weight``, no buffers or children and an eps, checked on a float32 input against that formula (Hugging
    Face's RMSNorm classes are one per architecture)."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    eps = next((getattr(module, name) for name in _EPS_NAMES if hasattr(module, name)), None)
    if type(module) is nn.RMSNorm:
        eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
        if len(module.normalized_shape) != 1 or weight is None:
            return None
    if (set(params) != {"weight"} or weight.dim() != 1 or weight.dtype != torch.float32 or not weight.is_cpu
            or list(module.buffers(recurse=False)) or list(module.children()) or isinstance(eps, bool)
            or not isinstance(eps, (int, float))):
        return None
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got = module(probe)
    except Exception:  # (a forward that takes other arguments: not a norm of one input)
        return None
    if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
        return None
    for offset in (0.0, 1.0):
        with torch.no_grad():
            want = norm_op.rms_norm_reference(probe, weight + offset, float(eps))
        if torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return float(eps), offset
    return None


class LoweredRMSNorm(nn.Module):
    """An RMS norm ``rms_norm_form`` recognised (its ``weight`` shared, under the same name), computed by
    ``kernel_key``'s library. Its class is this one, not the model's own norm class."""

    def __init__(self, norm: nn.Module, kernel_key: str) -> None:
        form = rms_norm_form(norm)
        if form is None:
            raise ValueError(f"LoweredRMSNorm takes an RMS norm over the last dimension, got {type(norm).__name__}")
        super().__init__()
        self.eps, self.offset = form
        self.weight = norm.weight
        self.kernel_key = kernel_key
        self.norm_class = type(norm).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        return norm_op.rms_norm(x, weight, self.eps, self.kernel_key)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, from {self.norm_class}"
