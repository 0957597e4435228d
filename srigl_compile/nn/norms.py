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

import copy
import math

import torch
import torch.nn as nn

from ..runtime import norm_op  # registers torch.ops.srigl_compile.tvm_layer_norm (no TVM import)
from .forward_signature import takes_one_input

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
    dimension (offset 1: Gemma's), else None. Read from what the module does, not its class name (Hugging Face's
    RMSNorm classes are one per architecture): a module whose forward takes one input, with one 1-d float32
    ``weight``, no buffers or children and an eps, checked against that formula on a copy of it (its hooks
    not run) with a random weight (a formula that only matches at the weight it holds, ``rms(x * (1 + w))`` at w
    = 0, does not pass) at two input scales, 1 and sqrt(eps) (where eps decides: ``x / (rms + eps)`` or another
    eps than the attribute's do not pass). Gated norms (``forward(x, gate=None)``) are not this."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    eps = next((getattr(module, name) for name in _EPS_NAMES if hasattr(module, name)), None)
    if type(module) is nn.RMSNorm:
        eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
        if len(module.normalized_shape) != 1 or weight is None:
            return None
    if (set(params) != {"weight"} or weight.dim() != 1 or weight.dtype != torch.float32 or not weight.is_cpu
            or list(module.buffers(recurse=False)) or list(module.children()) or isinstance(eps, bool)
            or not isinstance(eps, (int, float)) or eps < 0 or not takes_one_input(module)):
        return None
    generator = torch.Generator().manual_seed(0)
    trial = copy.deepcopy(module)
    with torch.no_grad():
        trial.weight.copy_(torch.randn(weight.shape, generator=generator))
    found = set()
    for scale in (1.0, math.sqrt(eps)) if eps > 0 else (1.0,):
        probe = scale * torch.randn(2, 3, weight.shape[0], generator=generator)
        try:
            with torch.no_grad():
                got = trial.forward(probe)  # (forward itself: the module's hooks are not the probe's business)
        except Exception:  # (a forward that needs more than one tensor: not a norm of one input)
            return None
        if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
            return None
        with torch.no_grad():
            found.add(next((offset for offset in (0.0, 1.0) if torch.allclose(
                got, norm_op.rms_norm_reference(probe, trial.weight + offset, float(eps)), rtol=1e-5, atol=1e-5)),
                None))
    return (float(eps), found.pop()) if len(found) == 1 and None not in found else None


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
