"""FoldBatchNormPass: fold each eval-mode BatchNorm into the Linear / Conv layer whose output it normalises.

With running statistics a BatchNorm is a per-channel affine map, y = x * scale + shift, where
scale = gamma / sqrt(running_var + eps) and shift = beta - running_mean * scale (gamma = 1, beta = 0 when not
affine). A layer whose output feeds only that BatchNorm absorbs it: weight rows times scale, bias b -> b * scale
+ shift. In a full-width condensed layer the ablated neurons output ``full_bias``, which becomes
full_bias * scale + shift. The BatchNorm is then replaced by ``nn.Identity``: the model keeps its class.

Contract.
    requires: inference: the model runs in eval mode afterwards (``fold_batchnorm`` and ``lower()`` return
              ``model.eval()``), where a BatchNorm applies its running statistics, never batch statistics.
              Convolutions take batched input. Layers and norms are matched by exact type (masked and lowered
              layers, subclasses with their own forward are not folded).
    ensures:  every BatchNorm1d/2d that (1) has running statistics, (2) has one name, is called once and has
              its state read nowhere else, (3) takes the output of a CondensedLinear / CondensedConv / nn.Linear /
              nn.Conv1d / nn.Conv2d called once, whose output nothing else uses, (4) matches that layer: its
              num_features is the layer's output width (n_active for compact layers), BatchNorm2d after 2-d convs,
              BatchNorm1d after 1-d convs or after a Linear whose output is provably [batch, features]
              (BatchNorm1d normalises dim 1, a Linear's features are its last dim) -- is nn.Identity, and its
              layer has a bias and computes layer + BatchNorm. Every other BatchNorm is untouched. In eval mode
              the outputs are unchanged up to float rounding (the fold is computed in float64). A graph that
              cannot be captured leaves the model as it was, with a warning.
    preserves: GRAPH and OUTPUT_SHAPES (a folded BatchNorm becomes nn.Identity under its name; no size changes).
"""

from __future__ import annotations

import collections
import copy
import logging

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import LayerError, TraceError
from ..nn.condensed import CondensedConv, CondensedLinear
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult, replace_submodule
from .graph_capture import ModelGraph, ModuleCall, is_state, module_calls
from .layer_edits import layer_edits
from .manager import PassManager
from .per_feature import passes_through

__all__ = ["FoldBatchNormPass", "fold_batchnorm", "plan_folds", "provably_2d"]

log = logging.getLogger(__name__)

_CONDENSED = (CondensedLinear, CondensedConv)
_DENSE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LINEARS = (nn.Linear, CondensedLinear)


def _state_read_elsewhere(call: ModuleCall, graph: ModelGraph) -> bool:
    """Whether the forward reads this module's parameters or buffers outside its call (``self.bn.weight`` read
    by hand, a tied weight): folding would change what that code sees."""
    prefix = f"{call.module}."
    if any(n.op == "get_attr" and str(n.target).startswith(prefix) for n in graph.graph.nodes):
        return True
    state = [a for n in call.nodes for a in n.all_input_nodes if is_state(a, graph)]
    return any(user not in call.nodes for a in state for user in a.users)


def _makes_2d(node: fx.Node, modules: dict) -> bool:
    """A flatten from dim 1 to the end, or a view / reshape to two sizes."""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1
    is_function = node.op == "call_function" and node.target in (torch.flatten, torch.reshape)
    if not node.args or not (is_function or node.op == "call_method"):
        return False
    name, rest = getattr(node.target, "__name__", node.target), node.args[1:]
    if name == "flatten":
        start = rest[0] if rest else node.kwargs.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if name in ("view", "reshape"):
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return len(sizes) == 2
    return False


def provably_2d(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` is [batch, features]: by the shape torch.export recorded, or (symbolic_trace, no shapes)
    by a 2-d flatten / reshape followed only by ops that keep the rank."""
    while isinstance(node, fx.Node):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.dim() == 2
        if _makes_2d(node, modules):
            return True
        is_linear = node.op == "call_module" and type(modules[node.target]) in _LINEARS
        if not (is_linear or passes_through(node, modules, conv=True)):
            return False
        node = node.args[0]
    return False


def _batchnorm_fits(layer: nn.Module, bn: nn.Module, layer_call: ModuleCall, modules: dict) -> bool:
    if bn.num_features != layer_edits(layer).out_width:
        return False
    if type(layer) in _LINEARS:
        return type(bn) is nn.BatchNorm1d and provably_2d(layer_call.output, modules)
    dims = layer.weight.dim() - 2  # (a condensed layer's weight is a stand-in of the dense one's shape)
    return type(bn) is (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)


def plan_folds(model: nn.Module, graph: ModelGraph) -> list[tuple[str, str]]:
    """(layer, BatchNorm) name pairs that the contract allows to fold."""
    modules = dict(model.named_modules())
    names_of = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    calls = module_calls(graph)
    call_count = collections.Counter(c.module for c in calls)
    call_by_output = {c.output: c for c in calls if c.output is not None}
    pairs = []
    for bn_call in calls:
        bn = modules.get(bn_call.module)
        if type(bn) not in _BATCHNORMS or not bn.track_running_stats or bn.running_mean is None:
            continue  # without running statistics a BatchNorm normalises by the batch: not a fixed affine map
        # A BatchNorm reachable under two names may be called by the other one: replacing one name is not enough.
        if names_of[id(bn)] > 1 or len(bn_call.inputs) != 1:
            continue
        layer_call = call_by_output.get(bn_call.inputs[0])
        layer = modules.get(layer_call.module) if layer_call else None
        if type(layer) not in _CONDENSED + _DENSE or any(u not in bn_call.nodes for u in layer_call.output.users):
            continue
        once = call_count[bn_call.module] == 1 and call_count[layer_call.module] == 1
        read_elsewhere = _state_read_elsewhere(bn_call, graph) or _state_read_elsewhere(layer_call, graph)
        if once and not read_elsewhere and _batchnorm_fits(layer, bn, layer_call, modules):
            pairs.append((layer_call.module, bn_call.module))
    return pairs


@torch.no_grad()
def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (scale, shift) with BN(x) = x * scale + shift per channel."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    return scale, shift if bn.bias is None else shift + bn.bias.double()


class FoldBatchNormPass(Pass):
    """Fold the BatchNorms ``plan_folds`` finds on the model's graph into their layers."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def __init__(self) -> None:
        self.folded: list[tuple[str, str]] = []

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        self.folded = []
        if not any(type(m) in _BATCHNORMS for m in model.modules()):
            return PassResult(model, modified=False)  # nothing to fold: no graph capture (export can be slow)
        try:
            graph = analyses.get(GRAPH, model)
        except TraceError as err:
            log.warning("BatchNorm layers stay unfolded (the model is still correct, only slower): %s", err)
            return PassResult(model, modified=False)
        self.folded = plan_folds(model, graph)
        for layer_name, bn_name in self.folded:
            layer_edits(model.get_submodule(layer_name)).scale_outputs_(*_scale_shift(model.get_submodule(bn_name)))
            replace_submodule(model, bn_name, nn.Identity())
        log.info("folded %d BatchNorms into their layers: %s", len(self.folded), self.folded)
        return PassResult(model, bool(self.folded))

    def ensures(self, result: PassResult) -> None:
        for layer_name, bn_name in self.folded:
            layer = result.module.get_submodule(layer_name)
            width = layer_edits(layer).bias_width
            if not isinstance(result.module.get_submodule(bn_name), nn.Identity) or layer.bias.numel() != width:
                raise LayerError(f"folding BatchNorm {bn_name!r} into {layer_name!r} left it inconsistent")


def fold_batchnorm(model: nn.Module, *, example_inputs=None, inplace: bool = False) -> nn.Module:
    """Return ``model`` in eval mode with every foldable BatchNorm folded into the layer before it (see the
    module's contract); ``lower()`` runs it by default.

    Args:
        model: a condensed model (or any model: dense Linear/Conv1d/Conv2d + BatchNorm fold too).
        example_inputs: as for ``condense``; needed to capture the graph of models symbolic_trace cannot trace.
        inplace: rewrite ``model`` itself instead of a deep copy.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> folded = fold_batchnorm(net)
        >>> type(folded[1]).__name__
        'Identity'
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(folded(x), net(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, not {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    return PassManager([FoldBatchNormPass()]).run(model, Analyses(example_inputs)).eval()
