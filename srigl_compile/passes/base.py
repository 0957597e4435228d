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

__all__ = ["Pass", "PassResult"]


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
