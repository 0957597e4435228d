"""Capture a model's dataflow graph and say which graph nodes consume each parameter.

``torch.fx.symbolic_trace`` (with Linear, Conv and MultiheadAttention as leaves) is tried first; where it fails
(Hugging Face transformers, nn.TransformerEncoder's control flow) ``torch.export`` runs on ``example_inputs``.
The result is only analysed: the user's model is never replaced by a GraphModule.

Example:
    >>> mg = capture_graph(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))
    >>> mg.method, sorted(mg.consumers)
    ('symbolic_trace', ['0.bias', '0.weight', '2.bias', '2.weight'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError

__all__ = ["ModelGraph", "capture_graph", "LEAF_TYPES"]

log = logging.getLogger(__name__)

LEAF_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


@dataclasses.dataclass
class ModelGraph:
    """A captured graph. consumers: parameter FQN -> nodes that read it (a leaf module's call node reads all of
    the leaf's parameters). inputs: the user-input placeholders."""

    graph: fx.Graph
    method: str
    consumers: dict[str, list[fx.Node]]
    inputs: list[fx.Node]


class _LayerTracer(fx.Tracer):
    """Keeps the sparsifiable layers as leaves and traces through every other module that contains one."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, LEAF_TYPES) or getattr(m, "srigl_leaf", False):
            return True
        if any(isinstance(c, LEAF_TYPES) for c in m.modules()):
            return False
        return super().is_leaf_module(m, qualname)


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.training = flag


def _trace(model: nn.Module) -> ModelGraph:
    tracer = _LayerTracer()
    graph = tracer.trace(model)
    modules = dict(model.named_modules())
    consumers: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            for pname, _ in modules[node.target].named_parameters(prefix=node.target):
                consumers.setdefault(pname, []).append(node)
        elif node.op == "get_attr":
            consumers.setdefault(node.target, []).extend(node.users)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return ModelGraph(graph, "symbolic_trace", consumers, inputs)


def _export(model: nn.Module, example_inputs: Any) -> ModelGraph:
    args, kwargs = _as_args(example_inputs)
    with _eval_mode(model), torch.no_grad():
        program = torch.export.export(model, args, kwargs, strict=False)
    signature = program.graph_signature
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    consumers = {fqn: list(placeholders[name].users) for name, fqn in signature.inputs_to_parameters.items()}
    inputs = [placeholders[name] for name in signature.user_inputs if name in placeholders]
    return ModelGraph(program.graph, "export", consumers, inputs)


def capture_graph(model: nn.Module, example_inputs: Any = None) -> ModelGraph:
    """symbolic_trace, else torch.export on ``example_inputs``, else a TraceError saying which failed and why."""
    try:
        return _trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError ...) on dynamic code
        trace_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        log.info("symbolic_trace failed (%s); trying torch.export", trace_error)
    if example_inputs is None:
        raise TraceError(
            f"torch.fx.symbolic_trace failed on {type(model).__name__} ({trace_error}). Pass example_inputs= "
            "(a tensor, a tuple of positional inputs, or a dict of keyword inputs such as input_ids) so that "
            "torch.export can capture the graph instead."
        )
    try:
        return _export(model, example_inputs)
    except Exception as err:
        export_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raise TraceError(
            f"could not capture a graph of {type(model).__name__}: torch.fx.symbolic_trace failed ({trace_error}) "
            f"and torch.export on example_inputs failed ({export_error}). Make the forward traceable, or check "
            "that example_inputs match the forward's signature."
        ) from err
