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
import copy
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError

__all__ = ["ModelGraph", "ModuleCall", "capture_graph", "trace_module", "module_calls", "is_state", "example_args",
           "eval_mode", "output_tensors", "LEAF_TYPES"]

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


@dataclasses.dataclass
class ModuleCall:
    """One call of a module in the graph: its nodes, the tensors it reads from outside (not its own parameters or
    buffers), and the node its result leaves by (None when several do)."""

    module: str
    nodes: set[fx.Node]
    inputs: list[fx.Node]
    output: fx.Node | None


def module_calls(graph: ModelGraph) -> list[ModuleCall]:
    """symbolic_trace: one call_module node per call. torch.export: the aten nodes sharing an innermost
    ``nn_module_stack`` entry (a second call of a module gets its own entry, ``name@1``)."""
    if graph.method == "symbolic_trace":
        return [ModuleCall(n.target, {n}, list(n.all_input_nodes), n) for n in graph.graph.nodes
                if n.op == "call_module"]
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key, (fqn, _) = next(reversed(stack.items()))
            groups.setdefault(key, (fqn, []))[1].append(node)
    calls = []
    for fqn, nodes in groups.values():
        inside = set(nodes)
        inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside and not is_state(a, graph)]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        calls.append(ModuleCall(fqn, inside, list(dict.fromkeys(inputs)), outputs[0] if len(outputs) == 1 else None))
    return calls


def is_state(node: fx.Node, graph: ModelGraph) -> bool:
    """A parameter, buffer or constant (not a user input)."""
    return node.op == "get_attr" or (node.op == "placeholder" and node not in graph.inputs)


class _LayerTracer(fx.Tracer):
    """Keeps the sparsifiable layers as leaves and traces through every other module that contains one."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, LEAF_TYPES) or getattr(m, "srigl_leaf", False):
            return True
        if any(isinstance(c, LEAF_TYPES) for c in m.modules()):
            return False
        return super().is_leaf_module(m, qualname)


def example_args(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for calling a model on ``example_inputs`` (a tensor, a tuple of positional inputs or a dict
    of keyword inputs); a TraceError for anything else."""
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
def eval_mode(model: nn.Module):
    """The model in eval mode for the block, each module's own training flag restored after."""
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.training = flag


def trace_module(module: nn.Module) -> fx.Graph:
    """symbolic_trace's graph of ``module`` with the sparsifiable (and condensed) layers as call_module leaves;
    raises what fx raises on code it cannot trace."""
    return _LayerTracer().trace(module)


def _trace(model: nn.Module) -> ModelGraph:
    graph = trace_module(model)
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


def output_tensors(value: Any, depth: int = 8) -> tuple[torch.Tensor, ...]:
    """Every tensor in a forward's output: through tuples, lists, dicts (a Hugging Face ModelOutput) and plain
    objects' attributes (a key/value cache), to ``depth`` levels."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool, type(None), nn.Module)):
        return ()
    if isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, (tuple, list, set)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return ()
    return tuple(t for item in items for t in output_tensors(item, depth - 1))


def _tensor_output_view(model: nn.Module) -> nn.Module:
    """The same module (shared parameters, submodules and names) whose forward returns its output's tensors as a
    flat tuple: torch.export rejects outputs it cannot flatten, such as a Hugging Face ``DynamicCache``."""
    base = type(model)
    view_cls = type(f"{base.__name__}TensorOutputs", (base,), {
        "forward": lambda self, *args, **kwargs: output_tensors(base.forward(self, *args, **kwargs))})
    view = copy.copy(model)  # shallow: the same _parameters / _modules dicts, so the same FQNs in the graph
    view.__class__ = view_cls
    return view


def _export(model: nn.Module, example_inputs: Any) -> ModelGraph:
    args, kwargs = example_args(example_inputs)
    with eval_mode(model), torch.no_grad():
        try:
            program = torch.export.export(model, args, kwargs, strict=False)
        except Exception as err:  # only the graph matters here, not the output's structure: retry on its tensors
            log.info("torch.export failed (%s); retrying with the output flattened to its tensors", err)
            try:
                program = torch.export.export(_tensor_output_view(model), args, kwargs, strict=False)
            except Exception:
                raise err from None  # the retry's failure would hide the first, more telling one
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
        hint = _DATA_DEPENDENT_HINT if "DataDependent" in type(err).__name__ or "data-dependent" in str(err) else ""
        raise TraceError(
            f"could not capture a graph of {type(model).__name__}: torch.fx.symbolic_trace failed ({trace_error}) "
            f"and torch.export on example_inputs failed ({export_error}). Make the forward traceable, or check "
            f"that example_inputs match the forward's signature.{hint}"
        ) from err


_DATA_DEPENDENT_HINT = (" The forward branches on tensor values, which export cannot follow. nn.Transformer's "
                        "layers do so when given an attention mask to test for causality: pass is_causal=True "
                        "(nn.TransformerDecoder: tgt_is_causal=True) in example_inputs, or no mask. A Hugging Face "
                        "model does so with dynamic RoPE scaling (rope_scaling type 'dynamic', whose frequencies "
                        "follow the sequence length): such a model cannot be captured; the other rope types "
                        "(linear, llama3, yarn) can.")
