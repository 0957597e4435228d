"""Passes that hand a lowered model's pooling and normalisation layers to the glue kernels its lowered layers'
libraries hold (``codegen.glue_kernels``):

- LowerMaxPoolPass: ``nn.MaxPool2d`` -> ``nn.pooling.LoweredMaxPool2d`` (the max-pool of a direct CPU
  convolution's library; equal to ``F.max_pool2d``: -inf padding, a NaN in a window wins);
- LowerGlobalAvgPoolPass: ``nn.AdaptiveAvgPool2d(1)`` -> ``nn.pooling.LoweredGlobalAvgPool2d`` (the global average
  pool of a direct CPU convolution's library; ``F.adaptive_avg_pool2d`` to float32 rounding);
- LowerLayerNormPass: ``nn.LayerNorm`` over the last dimension -> ``nn.norms.LoweredLayerNorm`` (the layer norm of
  a CPU Linear layer's library; ``F.layer_norm`` to float32 rounding, two-pass mean and variance; parameters
  shared);
- LowerRMSNormPass: an RMS norm (``nn.norms.rms_norm_form``: torch's ``nn.RMSNorm``, Llama-family and Gemma
  ``*RMSNorm`` modules, recognised by what they compute) -> ``nn.norms.LoweredRMSNorm`` (the RMS norm of a CPU
  Linear layer's library; the module's output to float32 rounding; its weight shared under the same name);
- LowerAttentionPass: a ``CondensedMultiheadAttention`` whose head dim is a multiple of 64 computes softmax(q k^T)
  v with the attention kernel of a CPU Linear layer's library (its ``attention_key``; ``runtime.attention_op``:
  SDPA to float32 rounding) in calls without mask, causality or weights; the others run torch's SDPA as before.

Contract (each).
    requires: after CompileKernelsPass (lowered layers with registered kernels).
    ensures:  outputs unchanged (as above). When the model has a lowered layer whose library holds the function,
              every layer the kernel can compute (``can_lower_max_pool``: floor mode, no indices;
              ``can_lower_global_avg_pool``: a 1 x 1 output;
              ``can_lower_layer_norm``: the last dimension; ``rms_norm_form``) becomes the lowered class calling
              that library; other
              models and layers are left as they were (``F.max_pool2d`` / ``F.adaptive_avg_pool2d`` /
              ``F.layer_norm`` in a module's forward too: not a layer to replace).
    preserves: GRAPH, OUTPUT_SHAPES (a leaf module under the same name computing the same values).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch.nn as nn

from ..nn.condensed_attention import CondensedMultiheadAttention
from ..nn.lowered import LoweredConv, LoweredLinear
from ..nn.norms import LoweredLayerNorm, LoweredRMSNorm, can_lower_layer_norm, rms_norm_form
from ..nn.pooling import LoweredGlobalAvgPool2d, LoweredMaxPool2d, can_lower_global_avg_pool, can_lower_max_pool
from ..runtime.attention_op import HEAD_MULTIPLE
from ..runtime.registry import get_registered
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult, replace_submodule

__all__ = ["LowerMaxPoolPass", "LowerGlobalAvgPoolPass", "LowerLayerNormPass", "LowerRMSNormPass",
           "LowerAttentionPass"]

log = logging.getLogger(__name__)


def _runs_linear_kernel(layer: nn.Module) -> bool:
    """A lowered Linear layer with a kernel (its library holds the linear glue: layer norm, attention)."""
    return isinstance(layer, LoweredLinear) and layer.values.shape[0] > 0


def _library_key(model: nn.Module, runs_kernel, function: str) -> str | None:
    """The kernel key of a lowered layer (one that ``runs_kernel``) whose handle holds ``function``."""
    for layer in model.modules():
        if runs_kernel(layer) and getattr(get_registered(layer.kernel_key), function, None) is not None:
            return layer.kernel_key
    return None


class _LowerToGluePass(Pass):
    """Replace each layer that ``lowerable`` by ``lowered(layer, key)``, where key is a lowered layer's (one that
    ``runs_kernel``) whose handle holds ``function``."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})
    function: ClassVar[str]

    @staticmethod
    def lowerable(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def runs_kernel(layer: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def lowered(module: nn.Module, key: str) -> nn.Module:
        raise NotImplementedError

    def _library_key(self, model: nn.Module) -> str | None:
        return _library_key(model, self.runs_kernel, self.function)

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        names = [name for name, module in model.named_modules(remove_duplicate=False) if self.lowerable(module)]
        key = self._library_key(model) if names else None
        if key is None:
            return PassResult(model, modified=False)
        for name in names:
            model = replace_submodule(model, name, self.lowered(model.get_submodule(name), key))
            log.info("lowered %s -> %s of %s", name, self.function, key)
        return PassResult(model, modified=True)


class LowerMaxPoolPass(_LowerToGluePass):
    """See the module docstring."""

    function = "max_pool_fn"
    lowerable = staticmethod(can_lower_max_pool)
    lowered = staticmethod(LoweredMaxPool2d)

    @staticmethod
    def runs_kernel(layer: nn.Module) -> bool:
        return isinstance(layer, LoweredConv) and layer.direct and layer.n_active > 0


class LowerGlobalAvgPoolPass(_LowerToGluePass):
    """See the module docstring."""

    function = "global_avg_pool_fn"
    lowerable = staticmethod(can_lower_global_avg_pool)
    lowered = staticmethod(LoweredGlobalAvgPool2d)
    runs_kernel = staticmethod(LowerMaxPoolPass.runs_kernel)


class LowerLayerNormPass(_LowerToGluePass):
    """See the module docstring."""

    function = "layer_norm_fn"
    lowerable = staticmethod(can_lower_layer_norm)
    lowered = staticmethod(LoweredLayerNorm)
    runs_kernel = staticmethod(_runs_linear_kernel)


class LowerRMSNormPass(_LowerToGluePass):
    """See the module docstring."""

    function = "rms_norm_fn"
    lowered = staticmethod(LoweredRMSNorm)
    runs_kernel = staticmethod(_runs_linear_kernel)

    @staticmethod
    def lowerable(module: nn.Module) -> bool:
        return rms_norm_form(module) is not None


class LowerAttentionPass(Pass):
    """See the module docstring."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        names = [name for name, m in model.named_modules() if isinstance(m, CondensedMultiheadAttention)
                 and m.head_dim % HEAD_MULTIPLE == 0 and not m.attention_key]
        key = _library_key(model, _runs_linear_kernel, "attention_fn") if names else None
        if key is None:
            return PassResult(model, modified=False)
        for name in names:
            model.get_submodule(name).attention_key = key
            log.info("lowered %s's attention -> the attention kernel of %s", name, key)
        return PassResult(model, modified=True)
