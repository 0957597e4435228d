"""The pass contract: ``requires`` (checked before), ``call`` (the rewrite), ``ensures`` (checked after), and
``preserves``: the analyses (``passes/analysis.py``) still true of the model after the pass modified it.

Example:
    >>> class Nothing(Pass):
    ...     def call(self, model, analyses):
    ...         return PassResult(model, modified=False)
    >>> Nothing()(torch.nn.Linear(2, 2)).modified
    False
"""

from __future__ import annotations

import abc
import dataclasses

import torch.nn as nn

from .analysis import Analyses, Analysis

__all__ = ["Pass", "PassResult", "replace_submodule"]


@dataclasses.dataclass
class PassResult:
    module: nn.Module
    modified: bool


class Pass(abc.ABC):
    """A model rewrite with stated pre- and post-conditions. Subclasses raise typed errors from both checks."""

    #: analyses that stay valid when this pass modifies the model in place (see each analysis's promise)
    preserves: frozenset[Analysis] = frozenset()

    def requires(self, model: nn.Module) -> None:
        """Raise if ``model`` does not meet this pass's precondition."""

    @abc.abstractmethod
    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        """Rewrite ``model`` (reading analyses of it from ``analyses``) and say whether anything changed."""

    def ensures(self, result: PassResult) -> None:
        """Raise if the rewritten model does not meet this pass's postcondition."""

    def default_analyses(self) -> Analyses:
        """Analyses for a run outside a pipeline (a pass given ``example_inputs`` hands them on)."""
        return Analyses(getattr(self, "example_inputs", None))

    def __call__(self, model: nn.Module, analyses: Analyses | None = None) -> PassResult:
        """Run the pass alone (fresh analyses) or in a ``PassManager``'s pipeline (its shared analyses)."""
        if analyses is None:
            analyses = self.default_analyses()
        self.requires(model)
        result = self.call(model, analyses)
        self.ensures(result)
        return result


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the model, which is ``new`` itself when ``name`` is the root
    ("": the model is a single layer)."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
