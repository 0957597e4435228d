"""FuseConvPoolPass: a direct convolution whose output only a max-pool reads runs with it, band by band.

A ResNet stem's convolution writes a 64 x 112 x 112 grid that only its max-pool reads: written whole it leaves
the caches (``runtime.conv_pool_op``). Where the captured graph shows a LoweredConv's output going to one
LoweredMaxPool2d alone, past ``nn.Identity`` modules (a folded BatchNorm, a fused ReLU), the pool's place gets a
``nn.conv_pool.LoweredConvMaxPool`` holding both, and the convolution's place a ``FusedConvPlace`` (an
``nn.Identity`` whose attributes read the convolution's): the model's own forward then hands the convolution's
input on to the fused module, unchanged.

Contract.
    requires: after PlanarLayoutPass (lowered pools and layers; the graph captured by ``torch.fx.symbolic_trace``
              with the pools as leaves).
    ensures:  each LoweredConv that ``can_fuse_conv_pool`` with a LoweredMaxPool2d, each called once, the
              conv's output read by the pool alone past nn.Identity calls (each also reading nothing else), is a
              FusedConvPlace and the pool a LoweredConvMaxPool of both; outputs' values unchanged; nothing else
              changes. A graph captured by torch.export (aten-level) or not at all: nothing is fused.
    preserves: nothing (the model's outputs are the same, but the convolution's name now outputs its input).
"""

from __future__ import annotations

import collections
import logging

import torch.fx as fx
import torch.nn as nn

from ..nn.conv_pool import FusedConvPlace, LoweredConvMaxPool, can_fuse_conv_pool
from ..nn.lowered import LoweredConv
from .analysis import Analyses, module_graph
from .base import Pass, PassResult, replace_submodule

__all__ = ["FuseConvPoolPass"]

log = logging.getLogger(__name__)


def _sole_reader(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The one node that reads the node's value past nn.Identity calls, when there is exactly one."""
    while len(node.users) == 1:
        (user,) = node.users
        if not (user.op == "call_module" and type(modules.get(user.target)) is nn.Identity):
            return user if user.op == "call_module" else None
        node = user
    return None


class FuseConvPoolPass(Pass):
    """See the module docstring (it preserves no analysis: ``Pass.preserves`` is empty)."""

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        modules = dict(model.named_modules())
        if not any(isinstance(m, LoweredConv) and m.direct for m in modules.values()):
            return PassResult(model, modified=False)
        graph = module_graph(analyses, model, "convolutions run with their max-pools")
        if graph is None:
            return PassResult(model, modified=False)
        calls = collections.Counter(n.target for n in graph.graph.nodes if n.op == "call_module")
        pairs = []
        for node in graph.graph.nodes:
            if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
                continue  # (an Identity in the conv's place passes on its one input)
            reader = _sole_reader(node, modules)
            if reader is not None and calls[reader.target] == 1 and can_fuse_conv_pool(
                    modules[node.target], modules[reader.target]):
                pairs.append((node.target, reader.target))
        for conv, pool in pairs:
            fused = LoweredConvMaxPool(model.get_submodule(conv), model.get_submodule(pool))
            model = replace_submodule(model, pool, fused)
            model = replace_submodule(model, conv, FusedConvPlace(fused.conv))
            log.info("%s runs with %s, band by band", conv, pool)
        return PassResult(model, modified=bool(pairs))
