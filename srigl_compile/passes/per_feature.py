"""Per-feature graph ops: nodes that map each feature of their one tensor input on its own (activations, dropout,
eval BatchNorm), so a constant feature stays a constant feature through them. ``ShrinkAblatedNeurons`` follows an
ablated neuron's constant through them; ``FoldBatchNormPass`` looks through them for a flatten.

Example:
    >>> passes_through(node, dict(model.named_modules()), conv=True)      # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["passes_through", "is_dropout", "is_aten"]

_ACT_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Hardswish,
                nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.elu, F.relu6,
                  F.hardswish, F.hardtanh, F.mish, F.softplus, torch.nn.functional.tanh, torch.nn.functional.sigmoid}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_ATEN_ACTS = {"relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "hardtanh", "hardswish", "mish",
              "softplus"}
_ATEN_DROPOUTS = {"dropout", "clone", "alias"}


def is_dropout(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _DROPOUT_MODULES)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "").split(".")[0]
        return node.target in _DROPOUT_FUNCTIONS or (is_aten(node) and name in _ATEN_DROPOUTS)
    return False


def is_aten(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload)


def _only_first_arg_is_tensor(node: fx.Node) -> bool:
    others = list(node.args[1:]) + list(node.kwargs.values())
    return not any(isinstance(a, fx.Node) for a in others)


def passes_through(node: fx.Node, modules: dict, conv: bool) -> bool:
    """A per-feature op whose only tensor input is the producer's value (args[0])."""
    if not node.args or not _only_first_arg_is_tensor(node):
        return False
    if node.op == "call_module":
        module = modules[node.target]
        is_bn = conv and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.track_running_stats
        return isinstance(module, _ACT_MODULES + _DROPOUT_MODULES) or is_bn
    if node.op == "call_function":
        if is_aten(node):
            return node.target._opname in _ATEN_ACTS | _ATEN_DROPOUTS
        return node.target in _ACT_FUNCTIONS | _DROPOUT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS
