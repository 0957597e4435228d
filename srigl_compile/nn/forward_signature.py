"""What a module's forward takes, read from its signature: passes that trace or probe a module with one tensor
need a forward of exactly one input (``takes_one_input``)."""

from __future__ import annotations

import inspect

import torch.nn as nn

__all__ = ["takes_one_input"]


def takes_one_input(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes exactly one argument, without a default. With more, a trace (every
    argument a Proxy) or a probe (the others left at their defaults) sees one path of code that branches on them:
    ``if identity is None``, a gated norm's ``gate=None``."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 1 and parameters[0].default is inspect.Parameter.empty and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
