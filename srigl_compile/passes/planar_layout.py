"""PlanarLayoutPass: a direct convolution whose output only readers of strided images read returns planar images,
or its output grid as it is.

A planar output is a strided view [B, C, H, W] whose channels lie a whole number of 16-float vectors apart
(``runtime.conv_geometry``): 208 floats for 14x14 maps, 64 for 7x7. The convolution writes its output grid there
without a crop, the next 1x1 convolution reads it as it is with every vector load on a cache line, and a padded
or strided one's pad copy reads it as it is too. On ResNet-50's last two stages this replaces the 1x1 kernels'
cache-line-splitting loads (196 and 49 lanes) and the copies into aligned planes around them. A lowered global
average pool reads planar images too (ResNet-50's last layer).

A pitched output is the convolution's output grid itself, [B, C, H, W] viewed with rows ``pitch`` floats apart
(the padded width: 112 columns of 115 for ResNet-50's stem): no crop copy at all. Only a lowered max-pool reads
those; a direct convolution's kernel needs its images' rows contiguous. (A convolution that one max-pool alone
reads then runs with it, band by band, ``passes/fuse_conv_pool.py``; its pitched output serves the calls that do
not: tracing, a dense form's trial.)

A strided view where torch's convolution returned a contiguous tensor would break a consumer that calls
``.view`` on it, so only outputs that the captured graph shows going to such readers alone (as input or residual,
past ``nn.Identity`` modules) become planar or pitched; anything else keeps contiguous outputs.

Contract.
    requires: after CompileKernelsPass, LowerMaxPoolPass and LowerGlobalAvgPoolPass (lowered layers and pools).
    ensures:  a LoweredConv running the direct kernel each of whose calls in the graph captured by
              ``torch.fx.symbolic_trace`` feeds only direct LoweredConvs (input or residual) and lowered global
              average pools, past nn.Identity, has ``planar_output`` set; one whose calls feed lowered max-pools
              only has ``planar_output`` and ``pitched_output`` set; outputs' values unchanged; nothing else
              changes. A graph captured by torch.export (aten-level) or not at all: no layer is marked.
    preserves: GRAPH, OUTPUT_SHAPES (an output's layout changes, not its values or shape).
"""

from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

from ..nn.lowered import LoweredConv
from ..nn.pooling import LoweredGlobalAvgPool2d, LoweredMaxPool2d
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses, module_graph
from .base import Pass, PassResult

__all__ = ["PlanarLayoutPass"]

log = logging.getLogger(__name__)


def _direct_conv(node: fx.Node, modules: dict[str, nn.Module]) -> LoweredConv | None:
    """The 2-d direct-kernel LoweredConv a node calls, if it calls one."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, LoweredConv) and module.direct and module.dims == 2:
        return module
    return None


# The layouts a reader takes, each taking the ones before it too: "" (contiguous only), planar, pitched.
_LAYOUTS = ("", "planar", "pitched")


def _reader_layout(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The widest layout a graph node reading an output takes."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if _direct_conv(node, modules) is not None or isinstance(module, LoweredGlobalAvgPool2d):
        return "planar"
    if isinstance(module, LoweredMaxPool2d):
        return "pitched"
    if type(module) is nn.Identity:  # passes its input through: what its readers take
        return _readers_layout(node, modules)
    return ""


def _readers_layout(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The widest layout every reader of the node's value takes ("" when it has none)."""
    if not node.users:
        return ""
    return min((_reader_layout(user, modules) for user in node.users), key=_LAYOUTS.index)


class PlanarLayoutPass(Pass):
    """See the module docstring."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        if not any(isinstance(m, LoweredConv) and m.direct for m in model.modules()):
            return PassResult(model, modified=False)
        graph = module_graph(analyses, model, "planar and pitched outputs")
        if graph is None:
            return PassResult(model, modified=False)
        modules = dict(model.named_modules())
        layouts: dict[str, str] = {}  # layer name -> the widest layout the readers of every call take
        for node in graph.graph.nodes:
            if _direct_conv(node, modules) is not None:
                layout = _readers_layout(node, modules)
                layouts[node.target] = min(layouts.get(node.target, layout), layout, key=_LAYOUTS.index)
        for name, layout in layouts.items():
            modules[name].planar_output = layout != ""
            modules[name].pitched_output = layout == "pitched"
        marked = {name: layout for name, layout in layouts.items() if layout}
        log.info("planar or pitched outputs: %s", marked)
        return PassResult(model, modified=bool(marked))
