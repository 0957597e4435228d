"""PlanarLayoutPass: a direct convolution whose output only direct convolutions read returns planar images.

A planar output is a strided view [B, C, H, W] whose channels lie a whole number of 16-float vectors apart
(``runtime.conv_geometry``): 208 floats for 14x14 maps, 64 for 7x7. The convolution writes its output grid there
without a crop, the next 1x1 convolution reads it as it is with every vector load on a cache line, and a padded
or strided one's pad copy reads it as it is too. On ResNet-50's last two stages this replaces the 1x1 kernels'
cache-line-splitting loads (196 and 49 lanes) and the copies into aligned planes around them.

A strided view where torch's convolution returned a contiguous tensor would break a consumer that calls
``.view`` on it, so only outputs that the captured graph shows going to direct convolutions alone (as input or
residual, past ``nn.Identity`` modules) become planar; anything else keeps contiguous outputs.

Contract.
    requires: after CompileKernelsPass (lowered layers).
    ensures:  a LoweredConv running the direct kernel each of whose calls in the graph captured by
              ``torch.fx.symbolic_trace`` feeds direct LoweredConvs only (input or residual, past nn.Identity) has
              ``planar_output`` set; outputs' values unchanged; nothing else changes. A graph captured by
              torch.export (aten-level) or not at all: no layer is marked.
    preserves: GRAPH, OUTPUT_SHAPES (an output's layout changes, not its values or shape).
"""

from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError
from ..nn.lowered import LoweredConv
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult

__all__ = ["PlanarLayoutPass"]

log = logging.getLogger(__name__)


def _direct_conv(node: fx.Node, modules: dict[str, nn.Module]) -> LoweredConv | None:
    """The 2-d direct-kernel LoweredConv a node calls, if it calls one."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, LoweredConv) and module.direct and module.dims == 2:
        return module
    return None


def _read_by_direct_convs_only(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Every reader of the node's value is a direct convolution, past nn.Identity modules (and there is one)."""
    if not node.users:
        return False
    for user in node.users:
        passes_through = user.op == "call_module" and type(modules.get(user.target)) is nn.Identity
        if passes_through:
            if not _read_by_direct_convs_only(user, modules):
                return False
        elif _direct_conv(user, modules) is None:
            return False
    return True


class PlanarLayoutPass(Pass):
    """See the module docstring."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        if not any(isinstance(m, LoweredConv) and m.direct for m in model.modules()):
            return PassResult(model, modified=False)
        try:
            graph = analyses.get(GRAPH, model)
        except TraceError as err:
            log.info("no planar outputs (the graph cannot be captured: %s)", err)
            return PassResult(model, modified=False)
        if graph.method != "symbolic_trace":
            return PassResult(model, modified=False)
        modules = dict(model.named_modules())
        verdicts: dict[str, bool] = {}  # layer name -> every call's output read by direct convolutions only
        for node in graph.graph.nodes:
            if _direct_conv(node, modules) is not None:
                verdicts[node.target] = verdicts.get(node.target, True) and _read_by_direct_convs_only(node, modules)
        planar = [name for name, ok in verdicts.items() if ok]
        for name in planar:
            modules[name].planar_output = True
        log.info("planar outputs: %s", planar)
        return PassResult(model, modified=bool(planar))
