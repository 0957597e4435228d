"""DenseConvolutionsPass: the dense 2-d convolutions of a sparse model as condensed layers of full fan-in, so that
``lower`` compiles them too.

ERK leaves a network's small early layers dense (ResNet-50 at 90%: ``layers.0.conv1``, 64 -> 64 1x1 on 56x56
maps), and a model may keep its first layer dense on purpose. Left in torch, such a layer runs oneDNN plus a
separate BatchNorm and ReLU, and hands its output between torch's thread pool and TVM's twice. As a condensed
layer with k = fan-in (every column, in order) it gets its BatchNorm folded, its activation fused and the
near-dense kernel (rows sharing one offset list); and like every near-dense CPU layer it keeps its dense form
(``nn.dense_fallback``), so at each input shape it runs whichever of the two measured faster. Without that
safety net (``LlvmConfig(dense_fallback=False)``, or another backend) ``lower`` does not run this pass.

Contract.
    requires: nothing.
    ensures:  every nn.Conv2d (the exact class) with one group and zero padding whose weight the captured graph
              reads only through its call is a CondensedConv under the same name, every neuron active with all
              fan-in inputs, computing the same output (none where the graph cannot be captured); nothing else
              changes.
    preserves: GRAPH, OUTPUT_SHAPES (a leaf under the same name, same call, same output).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import TraceError
from ..nn.condensed import CondensedConv
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult, replace_submodule
from .condense import weight_read_elsewhere

__all__ = ["DenseConvolutionsPass", "full_fan_in"]

log = logging.getLogger(__name__)


def _convertible(module: nn.Module) -> bool:
    """A dense convolution that a condensed layer with a dense form can stand for (``dense_form_for``'s cases)."""
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"


def full_fan_in(conv: nn.Conv2d) -> CondensedConv:
    """``conv`` as a condensed layer: every neuron active, reading all of its fan-in inputs in order."""
    n_out = conv.out_channels
    values = conv.weight.detach().reshape(n_out, -1).clone()
    columns = torch.arange(values.shape[1]).expand(n_out, -1).contiguous()
    layer = CondensedConv(conv, torch.arange(n_out), values, columns, conv.bias)
    layer.was_dense = True  # (its values stay float32 where sparse layers' become bfloat16: the user kept it dense)
    return layer


class DenseConvolutionsPass(Pass):
    """See the module docstring."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        found = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
                 if name and _convertible(module)]
        if not found:
            return PassResult(model, modified=False)
        try:
            graph = analyses.get(GRAPH, model)
        except TraceError as err:  # (which weights the forward reads itself is unknown: none converted)
            log.info("dense convolutions stay in torch: the graph cannot be captured (%s)", err)
            return PassResult(model, modified=False)
        modules = dict(model.named_modules())
        # a weight the forward computes with itself (weight standardisation) must stay a dense tensor
        found = [(name, module) for name, module in found if not weight_read_elsewhere(graph, name, modules)]
        condensed: dict[int, CondensedConv] = {}  # (a convolution under two names stays one module)
        for name, module in found:
            if id(module) not in condensed:
                condensed[id(module)] = full_fan_in(module)
            model = replace_submodule(model, name, condensed[id(module)])
            log.info("dense convolution %s -> a condensed layer of full fan-in", name)
        return PassResult(model, modified=bool(found))
