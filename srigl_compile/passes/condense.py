"""CondensePass: masked layers -> condensed [n_active, k] layers with a reference PyTorch forward; with
``shrink``, ablated neurons removed across the graph (``passes/shrink_ablated.py``).

Contract.
    requires: the model has masked layers, each constant fan-in (method "srigl" or "static"), whose weights outside
              their masks are zero (a condensed layer keeps only the weights under the mask: others would be dropped
              silently).
    ensures:  every MaskedLinear / MaskedConv1d / MaskedConv2d is a condensed layer whose output equals the masked
              layer's output (full width, or its active neurons only where ``shrink`` removed the ablated ones from
              it and their inputs from its consumers), and every MultiheadAttention with sparse projections is a
              CondensedMultiheadAttention, whose nn.TransformerEncoder runs without nested tensors (their path
              reads the packed in_proj_weight a condensed attention has not; with a padding mask, padded
              positions then hold what the layers compute there, not torch's zeros); nothing else changed.
              MaskedConv3d has no condensed form yet and stays masked, with a warning naming it; so does a layer
              whose weight the forward computes with itself (``F.linear(x, layer.weight)``), which a condensed
              layer could not serve. A graph that cannot be captured keeps every layer full width, with a
              warning.
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

__all__ = ["CondensePass", "condense", "refuse_stray_weights", "weights_read_directly", "weight_read_elsewhere"]

log = logging.getLogger(__name__)

_CONDENSED = {MaskedLinear: CondensedLinear, MaskedConv1d: CondensedConv, MaskedConv2d: CondensedConv}


def _condensed_class(layer: nn.Module):
    return next((c for masked, c in _CONDENSED.items() if isinstance(layer, masked)), None)


_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}  # what a condensed weight answers


def _reads_values(node, graph, name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether a graph node reading ``name``'s weight computes with its values outside the layer's own call."""
    if not name:  # (the model is the layer: the graph is its own forward)
        return False
    if graph.method == "symbolic_trace":  # the layer's call is a call_module; else the weight is a get_attr's
        return node.op != "call_module" and not (
            (node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA)
            or (node.op == "call_method" and node.target in ("size", "dim")))
    stack = [fqn for fqn, _ in (node.meta.get("nn_module_stack") or {}).values()]
    innermost = stack[-1] if stack else ""  # (torch.export: the module whose forward made the node)
    return innermost != name and not isinstance(modules.get(innermost), nn.MultiheadAttention)


def weights_read_directly(model: nn.Module, graph) -> set[str]:
    """The masked Linear / Conv layers whose weight the model's code computes with itself (``F.linear(x,
    self.qkv.weight)``, as torchvision's Swin attention does) instead of calling the layer. (The attention
    modules' own reads are CondensedMultiheadAttention's.)"""
    modules = dict(model.named_modules())
    return {name for name, layer in sparse_layers(model)
            if _condensed_class(layer) is not None and weight_read_elsewhere(graph, name, modules)}


def weight_read_elsewhere(graph, name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the captured graph computes with layer ``name``'s weight outside the layer's own call (a
    weight-standardised convolution, Swin's ``F.linear(x, self.qkv.weight)``)."""
    weight = f"{name}.weight" if name else "weight"
    return any(_reads_values(node, graph, name, modules) for node in graph.consumers.get(weight, []))


def refuse_stray_weights(layers: list[tuple[str, nn.Module]], verb: str, loss: str) -> None:
    """A LayerError naming the sparse ``layers`` with non-zero weights outside their masks, which the masked layers
    compute with and which ``verb`` (the caller) would change: ``loss`` says how."""
    stray = {name: (int(outside.count_nonzero()), float(outside.abs().max()))
             for name, layer in layers if (outside := layer.weight.detach()[~layer.mask]).count_nonzero()}
    if stray:
        name, (count, largest) = next(iter(stray.items()))
        raise LayerError(
            f"layers {sorted(stray)[:5]}{' ...' if len(stray) > 5 else ''} have non-zero weights outside their "
            f"masks ({name!r}: {count}, largest {largest:.3g}), which the masked layer computes with and {loss}. "
            "They come from averaging weights trained under other masks (AveragedModel / EMA), an optimizer moving "
            "weights whose gradients are zero, or code writing the weights. To "
            f"{verb} the model the masks describe, zero them first (this changes its outputs): for each sparse "
            "layer, layer.apply_mask_()")


class CondensePass(Pass):
    """Replace each masked Linear/Conv1d/Conv2d by its condensed form (in place) and, with ``shrink``, remove the
    ablated neurons whose width is not observable (planned on the masked model's graph, applied after)."""

    preserves = frozenset({GRAPH})

    def __init__(self, shrink: bool = True) -> None:
        self.shrink = shrink
        self.read_directly: set[str] = set()  # (kept masked; found by the last call)

    def requires(self, model: nn.Module) -> None:
        layers = list(sparse_layers(model))
        if not layers:
            raise LayerError("the model has no sparse layers to condense: sparsify and train it first")
        refuse_stray_weights(layers, "condense", "a condensed layer would drop")

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        plans, self.read_directly = [], set()
        try:
            graph = analyses.get(GRAPH, model)
        except TraceError as err:
            graph = None  # (every layer condensed, none shrunk: the model's code is not known)
            if self.shrink:
                warn_user(f"ablated neurons are kept at full width: {err}")
        if graph is not None:
            self.read_directly = weights_read_directly(model, graph)
            plans = [plan for plan in plan_shrink(model, graph) if self.shrink and self.read_directly.isdisjoint(
                {plan.producer, *plan.consumers})]
        if self.read_directly:
            warn_user(f"the forward reads the weight of {sorted(self.read_directly)} itself (e.g. F.linear(x, "
                      "layer.weight)) instead of calling the layer, and a condensed layer keeps no dense weight: "
                      "they stay masked (dense compute). Call the layer to have it condensed.")
        model, modified = self._condense_attention(model)
        kept = []
        for name, layer in list(sparse_layers(model)):
            condensed_cls = _condensed_class(layer)
            if condensed_cls is None:
                kept.append(f"{name} ({type(layer).__name__})")
                continue
            if name in self.read_directly:
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
        for encoder in model.modules():  # (the encoder's nested-tensor path reads the packed in_proj_weight)
            if isinstance(encoder, nn.TransformerEncoder) and isinstance(
                    getattr(encoder.layers[0], "self_attn", None), CondensedMultiheadAttention):
                encoder.use_nested_tensor = False
        return model, bool(found)

    def ensures(self, result: PassResult) -> None:
        left = [name for name, layer in sparse_layers(result.module)
                if _condensed_class(layer) is not None and name not in self.read_directly]
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"condense expects an nn.Module, not {type(model).__name__}")
    if not isinstance(shrink, bool):
        raise TypeError(f"condense: shrink={shrink!r} must be True or False")
    if not inplace:
        model = copy.deepcopy(model)
    # (a new module when the model is a single sparse layer)
    return PassManager([CondensePass(shrink)]).run(model, Analyses(example_inputs)).eval()
