"""Find the sparsifiable layers of a model from its graph, and which of them sit first and last.

A layer is a weight read by the captured graph: the weight of an ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (subclasses
that keep the base forward), the packed ``in_proj_weight`` (or q/k/v_proj_weight) of ``nn.MultiheadAttention``.
"First" layers have no other layer upstream of them in the graph; "last" (output) layers have none downstream:
the classifier of a CNN or ViT, both heads of a two-headed model.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [(c.name, c.is_first, c.is_last) for c in discover_layers(net, capture_graph(net))]
    [('0', True, False), ('2', False, True)]
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from .._warnings import warn_user
from ..errors import ConfigError
from ..nn.masked import MaskedMultiheadAttention, masked_class_for
from .graph_capture import ModelGraph, capture_graph

__all__ = ["LayerCandidate", "discover_layers", "capture_graph", "tied_parameter_ids"]

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass
class LayerCandidate:
    """A sparsifiable weight. name: the sparse layer's name after sparsify (module FQN, or ``<mha>.in_proj``);
    owner: the module holding the weight; param_name: its attribute on owner; kind: linear/convNd/attention."""

    name: str
    owner: nn.Module
    param_name: str
    kind: str
    shape: tuple[int, ...]
    nodes: list[fx.Node]
    is_first: bool = False
    is_last: bool = False

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _kind(module: nn.Module) -> str:
    for base, kind in ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d")):
        if isinstance(module, base):
            return kind
    raise TypeError(type(module).__name__)


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(layer name, owner, param name, kind) for every sparsifiable weight, in module order."""
    found = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for pname in MaskedMultiheadAttention.PACKED:
                if module._parameters.get(pname) is not None:
                    child = MaskedMultiheadAttention.child_name(pname)
                    found.append((f"{fqn}.{child}" if fqn else child, module, pname, "attention"))
        elif masked_class_for(module) is not None:
            found.append((fqn, module, "weight", _kind(module)))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            warn_user(f"layer {fqn!r} ({type(module).__name__}) overrides forward, so its masked form is unknown; it "
                      "stays dense. Exclude it with filter_fn to silence this warning.")
        elif _unsupported_weight(module):
            warn_user(f"layer {fqn!r} ({type(module).__name__}) has a weight matrix but no masked form (supported: "
                      "Linear, Conv1d/2d/3d, MultiheadAttention); it stays dense")
    return found


_DENSE_BY_DESIGN = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                    nn.RMSNorm)


def _unsupported_weight(module: nn.Module) -> bool:
    """A module with its own 2-D+ weight that sparsify cannot mask (ConvTranspose, an RNN's weight_ih/hh, ...)."""
    if isinstance(module, nn.RNNBase):
        return True
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2 and not isinstance(module, _DENSE_BY_DESIGN)


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights such as a shared embedding/head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _mark_first_last(candidates: list[LayerCandidate], graph: fx.Graph) -> None:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        g.add_edges_from((node, user) for user in node.users)
    owner_of: dict[fx.Node, set[int]] = {}
    for i, c in enumerate(candidates):
        for node in c.nodes:
            owner_of.setdefault(node, set()).add(i)
    for i, c in enumerate(candidates):
        up = set().union(*(nx.ancestors(g, n) for n in c.nodes))
        down = set().union(*(nx.descendants(g, n) for n in c.nodes))
        c.is_first = not any(owner_of.get(n, set()) - {i} for n in up)
        c.is_last = not any(owner_of.get(n, set()) - {i} for n in down)


def discover_layers(model: nn.Module, graph: ModelGraph, filter_fn: FilterFn | None = None) -> list[LayerCandidate]:
    """Every sparsifiable weight that the graph reads, with first/last marks.

    Weights the traced forward never reads, tied weights, weights computed by a parametrization and layers
    rejected by ``filter_fn(module, name)`` stay dense; all but the last are reported with a warning naming them.
    """
    tied = tied_parameter_ids(model)
    fqn_of = {id(p): name for name, p in model.named_parameters()}
    candidates = []
    for name, owner, pname, kind in _weights(model):
        weight = getattr(owner, pname)
        if id(weight) in tied:
            warn_user(f"layer {name!r}: its weight is tied to another module's; it stays dense")
            continue
        if id(weight) not in fqn_of:  # computed each forward from other parameters
            warn_user(f"layer {name!r}: its weight is computed on the fly (a parametrization such as weight norm), "
                      "not a parameter sparsify can mask; it stays dense. torch.nn.utils.parametrize."
                      "remove_parametrizations(layer, 'weight') turns it into a plain weight.")
            continue
        nodes = graph.consumers.get(fqn_of[id(weight)], [])
        if not nodes:
            warn_user(f"layer {name!r} is never used by the traced forward; it stays dense")
            continue
        candidates.append(LayerCandidate(name, owner, pname, kind, tuple(weight.shape), nodes))
    _mark_first_last(candidates, graph.graph)
    if filter_fn is not None:
        candidates = [c for c in candidates if _kept(filter_fn, c)]
    log.info("found %d sparsifiable layers via %s", len(candidates), graph.method)
    return candidates


def _kept(filter_fn: FilterFn, candidate: LayerCandidate) -> bool:
    """``filter_fn(module, name)``; a function of another signature is a ConfigError saying which it must have."""
    try:
        return bool(filter_fn(candidate.owner, candidate.name))
    except TypeError as err:
        if "argument" not in str(err):  # (an error inside a function of the right signature is the user's own)
            raise
        raise ConfigError(f"filter_fn is called as filter_fn(module, name) -> bool, and failed so on layer "
                          f"{candidate.name!r}: {err}") from err
