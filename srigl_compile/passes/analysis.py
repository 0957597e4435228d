"""Analyses: facts about a model computed once and kept until a pass invalidates them.

A pipeline (``condense``, ``fold_batchnorm``, ``lower``) runs its passes through one ``PassManager`` with one
``Analyses``: the graph is captured once (``GRAPH``) and output sizes come from one fake forward
(``OUTPUT_SHAPES``), however many passes read them. After a pass that modified the model, every analysis it does
not list in ``Pass.preserves`` is dropped and recomputed on demand; a pass that returns a different module object
(a model that was one layer) drops them all.

What each analysis promises, and so what a pass may preserve:
    GRAPH: the dataflow between modules, by name: which module calls read which outputs, parameters by name, and
        tensor ranks. Node sizes recorded by torch.export are those of the model when captured (a width removed
        later is not reflected): read sizes from OUTPUT_SHAPES. Swapping a layer for one with the same name and
        call signature, or changing widths, preserves it.
    OUTPUT_SHAPES: module name -> the shape of its output on ``example_inputs`` (modules returning a tensor
        only; empty without example inputs or when a fake forward fails). Changing dtypes or a layer's internal
        form preserves it; changing a width does not.

Example:
    >>> analyses = Analyses()
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> analyses.get(GRAPH, net) is analyses.get(GRAPH, net)    # captured once
    True
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import TraceError
from .graph_capture import capture_graph, eval_mode, example_args

__all__ = ["Analysis", "Analyses", "GRAPH", "OUTPUT_SHAPES"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A fact computed from a model and the pipeline's example inputs; raising is a result too (cached, re-raised)."""

    name: str
    compute: Callable[[nn.Module, Any], Any]


def _output_shapes(model: nn.Module, example_inputs: Any) -> dict[str, torch.Size]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    if example_inputs is None:
        return {}
    shapes: dict[str, torch.Size] = {}

    def record(name):
        def hook(module, args, out) -> None:  # (a hook returning a value would replace the output)
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, out.shape)
        return hook

    # (nn.Module's own method: a condensed layer's warns users that its hook sees the fused epilogue)
    hooks = [nn.Module.register_forward_hook(m, record(name)) for name, m in model.named_modules()]
    try:
        args, kwargs = example_args(example_inputs)
        with eval_mode(model), FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            model(*tree_map(fake, args), **tree_map(fake, kwargs))
    except Exception as err:  # an op without a fake implementation: sizes unknown, which passes must accept
        log.info("no output sizes from a fake forward (%s)", err)
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


GRAPH = Analysis("graph", capture_graph)
OUTPUT_SHAPES = Analysis("output_shapes", _output_shapes)


class Analyses:
    """The cached analyses of one model (the first one asked about; another model object starts afresh)."""

    def __init__(self, example_inputs: Any = None) -> None:
        self.example_inputs = example_inputs
        self._model: nn.Module | None = None
        self._results: dict[str, tuple[bool, Any]] = {}  # name -> (ok, value or the exception raised)

    def get(self, analysis: Analysis, model: nn.Module) -> Any:
        if model is not self._model:
            self.invalidate()
            self._model = model
        if analysis.name not in self._results:
            try:
                self._results[analysis.name] = (True, analysis.compute(model, self.example_inputs))
            except Exception as err:  # e.g. a TraceError: the next pass asking gets it without a second attempt
                self._results[analysis.name] = (False, err)
        ok, value = self._results[analysis.name]
        if not ok:
            raise value
        return value

    def invalidate(self, preserved: frozenset[Analysis] = frozenset()) -> None:
        kept = {a.name for a in preserved}
        self._results = {name: result for name, result in self._results.items() if name in kept}

    @property
    def computed(self) -> list[str]:
        return sorted(self._results)


def module_graph(analyses: Analyses, model: nn.Module, skipped: str):
    """The GRAPH analysis when ``torch.fx.symbolic_trace`` captured it (module calls as nodes, what passes that
    follow one module's output to the modules reading it need), else None, logging that ``skipped`` is skipped and
    why (a torch.export capture is aten-level; a model that cannot be captured at all)."""
    try:
        graph = analyses.get(GRAPH, model)
    except TraceError as err:
        log.info("%s: skipped (the graph cannot be captured: %s)", skipped, err)
        return None
    if graph.method != "symbolic_trace":
        log.info("%s: skipped (the graph was captured by %s, not at module level)", skipped, graph.method)
        return None
    return graph
