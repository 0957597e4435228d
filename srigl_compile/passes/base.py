"""The pass contract: ``requires`` (checked before), ``call`` (the rewrite), ``ensures`` (checked after).

Example:
    >>> class Nothing(Pass):
    ...     def call(self, model):
    ...         return PassResult(model, modified=False)
    >>> Nothing()(torch.nn.Linear(2, 2)).modified
    False
"""

from __future__ import annotations

import abc
import dataclasses

import torch.nn as nn

__all__ = ["Pass", "PassResult", "replace_submodule"]


@dataclasses.dataclass
class PassResult:
    module: nn.Module
    modified: bool


class Pass(abc.ABC):
    """A model rewrite with stated pre- and post-conditions. Subclasses raise typed errors from both checks."""

    def requires(self, model: nn.Module) -> None:
        """Raise if ``model`` does not meet this pass's precondition."""

    @abc.abstractmethod
    def call(self, model: nn.Module) -> PassResult:
        """Rewrite ``model`` and say whether anything changed."""

    def ensures(self, result: PassResult) -> None:
        """Raise if the rewritten model does not meet this pass's postcondition."""

    def __call__(self, model: nn.Module) -> PassResult:
        self.requires(model)
        result = self.call(model)
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
