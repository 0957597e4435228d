"""CondensePass: masked layers -> condensed [n_active, k] layers with a reference PyTorch forward; with
``shrink``, ablated neurons removed across the graph (``passes/shrink_ablated.py``).

Contract.
    requires: the model has masked layers, each constant fan-in (method "srigl" or "static").
    ensures:  every MaskedLinear / MaskedConv1d / MaskedConv2d is a condensed layer whose output equals the masked
              layer's output (full width, or its active neurons only where ``shrink`` removed the ablated ones from
              it and their inputs from its consumers), and every MultiheadAttention with sparse projections is a
              CondensedMultiheadAttention; nothing else changed. MaskedConv3d has no condensed form yet and stays
              masked, with a warning naming it. A graph that cannot be captured keeps every layer full width,
              with a warning.
    preserves: GRAPH (layers are swapped under their names with the same call signature; widths change).
"""

from __future__ import annotations

import copy
import logging

import torch.nn as nn

from .._warnings import warn_user
from ..errors import LayerError, TraceError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.condensed_attention import CondensedMultiheadAttention
from ..nn.masked import MaskedConv1d, MaskedConv2d, MaskedLinear, is_masked
from .analysis import GRAPH, Analyses
from .base import Pass, PassResult, replace_submodule
from .manager import PassManager
from .shrink_ablated import apply_shrink, plan_shrink
from .sparsify import sparse_layers

__all__ = ["CondensePass", "condense"]

log = logging.getLogger(__name__)

_CONDENSED = {MaskedLinear: CondensedLinear, MaskedConv1d: CondensedConv, MaskedConv2d: CondensedConv}


def _condensed_class(layer: nn.Module):
    return next((c for masked, c in _CONDENSED.items() if isinstance(layer, masked)), None)


class CondensePass(Pass):
    """Replace each masked Linear/Conv1d/Conv2d by its condensed form (in place) and, with ``shrink``, remove the
    ablated neurons whose width is not observable (planned on the masked model's graph, applied after)."""

    preserves = frozenset({GRAPH})

    def __init__(self, shrink: bool = True) -> None:
        self.shrink = shrink

    def requires(self, model: nn.Module) -> None:
        if not any(True for _ in sparse_layers(model)):
            raise LayerError("the model has no sparse layers to condense: sparsify and train it first")

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        plans = []
        if self.shrink:
            try:
                plans = plan_shrink(model, analyses.get(GRAPH, model))
            except TraceError as err:
                warn_user(f"ablated neurons are kept at full width: {err}")
        model, modified = self._condense_attention(model)
        kept = []
        for name, layer in list(sparse_layers(model)):
            condensed_cls = _condensed_class(layer)
            if condensed_cls is None:
                kept.append(f"{name} ({type(layer).__name__})")
                continue
            model = replace_submodule(model, name, condensed_cls.from_masked(layer, name or type(layer).__name__))
            modified = True
        if kept:
            warn_user(f"no condensed form yet for {kept}; they stay masked (dense compute)")
        removed = apply_shrink(model, plans)
        log.info("condensed; removed %d ablated neurons across %d layers", removed, len(plans))
        return PassResult(model, modified)

    @staticmethod
    def _condense_attention(model: nn.Module) -> tuple[nn.Module, bool]:
        """Attention modules holding sparse projections become CondensedMultiheadAttention."""
        found = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention) and any(is_masked(c) for c in m.modules())]
        for name, mha in found:
            model = replace_submodule(model, name, CondensedMultiheadAttention.from_attention(mha, name))
        return model, bool(found)

    def ensures(self, result: PassResult) -> None:
        left = [name for name, layer in sparse_layers(result.module) if _condensed_class(layer) is not None]
        if left:
            raise LayerError(f"layers {left} were not condensed")


def condense(model: nn.Module, *, example_inputs=None, shrink: bool = True, inplace: bool = False) -> nn.Module:
    """Return ``model`` (in eval mode: an inference form) with every sparse layer condensed to values/indices
    [n_active, k].

    Args:
        model: a model from ``sparsify`` (typically trained with SRigLUpdater).
        example_inputs: as for ``sparsify``; needed to capture the graph of models symbolic_trace cannot trace.
        shrink: remove ablated neurons across the graph where their width is not observable (see
            ``passes/shrink_ablated.py``); without it, condensed layers keep their full output width.
        inplace: rewrite ``model`` itself instead of a deep copy (a model that is one sparse layer is returned
            as a new condensed layer either way).

    Example:
        >>> import torch, torch.nn as nn
        >>> from srigl_compile import SRigLConfig, sparsify
        >>> sparse = sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)), SRigLConfig(0.9))
        >>> x = torch.randn(3, 32)
        >>> torch.allclose(condense(sparse)(x), sparse(x), atol=1e-5)
        True
    """
    if not inplace:
        model = copy.deepcopy(model)
    # (a new module when the model is a single sparse layer)
    return PassManager([CondensePass(shrink)]).run(model, Analyses(example_inputs)).eval()
