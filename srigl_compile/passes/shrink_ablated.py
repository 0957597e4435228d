"""ShrinkAblatedNeurons: remove ablated neurons from the producer and the matching inputs from its consumers.

An ablated neuron has no inputs, so it outputs a constant: its bias, then whatever the elementwise ops and eval
BatchNorm after it make of that (act(bias), or relu(BN shift) after a conv + BN). Where every use of a producer's
output reaches Linear/Conv consumers only through such per-feature ops, the neuron's row goes from the producer,
its channel from any BatchNorm on the way (after a convolution, or a Linear whose output is [batch, features]),
its input column from each consumer, and its constant, times the consumer's weights, is folded into the
consumer's bias. A consumer takes them only where it reads the producer's features: a Linear a Linear's, a
convolution a convolution's.

Contract.
    requires: ``plan_shrink`` ran on the *masked* model's graph (captured as for sparsify); ``apply_shrink`` runs on
              the same model after CondensePass, so layers are found by name.
    ensures:  the model's output is unchanged (up to float rounding of the folded constants). A producer is left
              full width (nothing removed) where the width is observable: a residual add, a concat, a reshape or
              flatten, a norm over features, the model output, attention, a grouped consumer, a consumer that
              is also called elsewhere, or a padded conv consumer whose folded constant would not be constant at
              the borders (exact only when it is 0).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.masked import MaskedConv1d, MaskedConv2d, MaskedLinear
from .fold_batchnorm import provably_2d
from .graph_capture import ModelGraph
from .layer_edits import layer_edits
from .per_feature import is_aten, is_dropout, passes_through
from .sparsify import sparse_layers

__all__ = ["ShrinkPlan", "plan_shrink", "apply_shrink"]

log = logging.getLogger(__name__)

_SHRINKABLE = (MaskedLinear, MaskedConv1d, MaskedConv2d)


@dataclasses.dataclass
class ShrinkPlan:
    """Remove ``removed`` output channels of ``producer``; BatchNorms on the way lose them too; each consumer
    loses those input channels and adds constant[c] x its weights to its bias."""

    producer: str
    removed: torch.Tensor
    batchnorms: list[str]
    consumers: dict[str, torch.Tensor]


def _layer_nodes(model: nn.Module, graph: ModelGraph) -> dict[fx.Node, str]:
    """graph node -> name of the Linear/Conv layer it computes: the layer's own module call (symbolic_trace) or
    an aten linear/conv reading the layer's weight as its second argument (torch.export)."""
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        for node in graph.consumers.get(f"{name}.weight" if name else "weight", []):
            own_call = node.op == "call_module" and node.target == name
            aten_op = (node.op == "call_function" and is_aten(node) and len(node.args) > 1
                       and isinstance(node.args[1], fx.Node) and node.args[1].op == "placeholder"
                       and node.target._opname in ("linear", "conv1d", "conv2d", "convolution"))
            if own_call or aten_op:
                names[node] = name
    return names


def _batchnorm(x: torch.Tensor, bn: nn.Module, channels: torch.Tensor) -> torch.Tensor:
    pick = lambda t: None if t is None else t.detach().index_select(0, channels)  # noqa: E731
    return F.batch_norm(x, pick(bn.running_mean), pick(bn.running_var), pick(bn.weight), pick(bn.bias),
                        training=False, eps=bn.eps)


def _constant(value: torch.Tensor, channels: torch.Tensor, path: list[fx.Node], modules: dict,
              dims: int) -> torch.Tensor:
    """Push the ablated neurons' constant outputs through the per-feature ops of one path."""
    x = value.reshape(1, -1, *([1] * dims))
    with torch.no_grad():
        for node in path:
            if is_dropout(node, modules):
                continue  # inference: dropout is the identity
            if node.op == "call_module":
                module = modules[node.target]
                is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                x = _batchnorm(x, module, channels) if is_bn else module(x)
            elif node.op == "call_method":
                x = getattr(x, node.target)(*node.args[1:], **node.kwargs)
            else:
                x = node.target(x, *node.args[1:], **node.kwargs)
    return x.reshape(-1)


def _walk(start: fx.Node, layer_of: dict, modules: dict, conv: bool):
    """Follow every use of ``start``. Returns [(consumer layer, path of per-feature nodes)], or None where the
    width is observable."""
    found, stack = [], [(start, [])]
    while stack:
        node, path = stack.pop()
        if not node.users:
            return None
        for user in node.users:
            if user.args and user.args[0] is not node:
                return None
            if user in layer_of:
                found.append((layer_of[user], path))
            elif passes_through(user, modules, conv):
                stack.append((user, path + [user]))
            else:
                return None
    return found


def _linear_output_2d(node: fx.Node, modules: dict) -> bool:
    """Whether a Linear layer's call ``node`` gives [batch, features]: by its recorded shape, or (a traced call of
    the masked layer, no shapes) by its input's."""
    return provably_2d(node.args[0] if node.op == "call_module" else node, modules)


def _padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _consumer_ok(module: nn.Module, constant: torch.Tensor, producer_is_linear: bool) -> bool:
    """Whether ``module`` reads the producer's neurons as its input features: a Linear reads a tensor's last
    dimension, a convolution dimension 1, and per-feature ops keep the producer's shape, so a Linear's neurons
    reach a Linear's inputs and a convolution's a convolution's (a Linear reading a convolution's [B, C, L] output
    mixes L, not C: a probe found its columns dropped by channel, silently wrong)."""
    if isinstance(module, nn.Linear):
        return producer_is_linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and not producer_is_linear:
        # A padded conv sees zeros, not the constant, at its borders: folding is exact only for a zero constant.
        return not _padded(module) or bool(torch.all(constant == 0))
    return False


def plan_shrink(model: nn.Module, graph: ModelGraph) -> list[ShrinkPlan]:
    """Which ablated neurons of a masked model can be removed, and what each consumer must fold in."""
    modules = dict(model.named_modules())
    layer_of = _layer_nodes(model, graph)
    layer_calls = Counter(layer_of.values())
    calls = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    plans = []
    for name, layer in sparse_layers(model):
        nodes = [n for n, owner in layer_of.items() if owner == name]
        if not isinstance(layer, _SHRINKABLE) or len(nodes) != 1:
            continue
        removed = (layer.neuron_view(layer.mask).view(torch.uint8).sum(dim=1) == 0).nonzero().squeeze(1)
        if removed.numel() == 0 or removed.numel() == layer.mask.shape[0]:
            continue
        # (a BatchNorm after the layer normalises dimension 1: its channels, or a Linear's features where its
        # output is [batch, features])
        per_feature_bn = not isinstance(layer, nn.Linear) or _linear_output_2d(nodes[0], modules)
        uses = _walk(nodes[0], layer_of, modules, conv=per_feature_bn)
        if not uses:
            log.info("%s: %d ablated neurons kept (output width is observable)", name, removed.numel())
            continue
        if any(layer_calls[consumer] > 1 for consumer, _ in uses):
            log.info("%s: %d ablated neurons kept (a consumer is called elsewhere too, with all its inputs)", name,
                     removed.numel())
            continue  # (its input columns would go from every call)
        bns = sorted({n.target for _, path in uses for n in path if n.op == "call_module"
                      and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm)})
        if any(calls.count(bn) > 1 for bn in bns):
            continue  # a BatchNorm also used elsewhere cannot lose channels
        bias = layer.bias.detach()[removed] if layer.bias is not None else \
            torch.zeros(removed.numel(), dtype=layer.weight.dtype)  # (float64 models stay float64)
        consumers = {c: _constant(bias, removed, path, modules, layer.weight.dim() - 2) for c, path in uses}
        if len(consumers) == len(uses) and all(_consumer_ok(modules[c], v, isinstance(layer, nn.Linear))
                                               for c, v in consumers.items()):
            plans.append(ShrinkPlan(name, removed, bns, consumers))
    return plans


def _keep(n: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep


@torch.no_grad()
def _slice_batchnorm(bn: nn.Module, keep: torch.Tensor) -> None:
    for attr in ("running_mean", "running_var"):
        setattr(bn, attr, getattr(bn, attr)[keep].clone())
    for attr in ("weight", "bias"):
        if getattr(bn, attr) is not None:
            setattr(bn, attr, nn.Parameter(getattr(bn, attr)[keep].clone()))
    bn.num_features = int(keep.sum())


def apply_shrink(model: nn.Module, plans: list[ShrinkPlan]) -> int:
    """Apply ``plan_shrink``'s plans to the condensed model; returns how many neurons were removed."""
    removed_total = 0
    for plan in plans:
        producer = model.get_submodule(plan.producer)
        if not isinstance(producer, (CondensedLinear, CondensedConv)):
            continue
        keep = _keep(producer.n_out, plan.removed)
        producer.set_compact_()
        for bn in plan.batchnorms:
            _slice_batchnorm(model.get_submodule(bn), keep)
        for name, constant in plan.consumers.items():
            constant_full = torch.zeros(producer.n_out, dtype=constant.dtype)
            constant_full[plan.removed] = constant
            layer_edits(model.get_submodule(name)).drop_inputs_(keep, constant_full)
        removed_total += plan.removed.numel()
    return removed_total
