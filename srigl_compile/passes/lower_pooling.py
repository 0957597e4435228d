"""LowerMaxPoolPass: a lowered model's ``nn.MaxPool2d`` layers run by the max-pool kernel its convolution
libraries hold (``nn.pooling.LoweredMaxPool2d``).

Contract.
    requires: after CompileKernelsPass (lowered layers with registered kernels).
    ensures:  outputs unchanged (the kernel equals ``F.max_pool2d``: -inf padding, a NaN in a window wins). When
              the model has a direct CPU convolution whose library holds the max-pool, every ``nn.MaxPool2d``
              that ``can_lower_max_pool`` (floor mode, no indices) is a LoweredMaxPool2d calling that library;
              other models and pooling layers are left as they were (pooling in a module's forward through
              ``F.max_pool2d`` too: it is not a layer to replace).
    preserves: GRAPH, OUTPUT_SHAPES (a leaf module under the same name computing the same values).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..nn.lowered import LoweredConv
from ..nn.pooling import LoweredMaxPool2d, can_lower_max_pool
from ..runtime.registry import get_registered
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult, replace_submodule

__all__ = ["LowerMaxPoolPass"]

log = logging.getLogger(__name__)


def _pool_library_key(model: nn.Module) -> str | None:
    """The kernel key of a lowered convolution whose handle holds the max-pool function, or None."""
    for layer in model.modules():
        if isinstance(layer, LoweredConv) and layer.direct and layer.n_active:
            if getattr(get_registered(layer.kernel_key), "max_pool_fn", None) is not None:
                return layer.kernel_key
    return None


class LowerMaxPoolPass(Pass):
    """See the module docstring."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        pools = [name for name, module in model.named_modules(remove_duplicate=False) if can_lower_max_pool(module)]
        key = _pool_library_key(model) if pools else None
        if key is None:
            return PassResult(model, modified=False)
        for name in pools:
            model = replace_submodule(model, name, LoweredMaxPool2d(model.get_submodule(name), key))
            log.info("lowered %s -> max-pool kernel of %s", name, key)
        return PassResult(model, modified=True)
