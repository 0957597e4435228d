"""What a module's forward takes and does to its inputs, read from its signature and source: passes that trace or
probe a module with one tensor need a forward of exactly one input (``takes_one_input``); passes that replace a
forward by its fx trace need one that updates no input by augmented assignment (``updates_inputs_in_place``)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch.nn as nn

__all__ = ["takes_one_input", "updates_inputs_in_place"]


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


def updates_inputs_in_place(module: nn.Module) -> bool:
    """Whether ``module``'s forward may update one of its inputs by augmented assignment (``x += y`` on an argument,
    or on a name bound to one), which its fx trace records as an out-of-place op (fx proxies have no ``__iadd__``):
    a caller reading that tensor afterwards would see other values. A name the forward's own top-level statements
    bound to something else before (``x = self.conv(x)``) no longer holds the input. True when the source cannot
    be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
    except (OSError, TypeError, SyntaxError):
        return True
    function = tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return True
    arguments = function.args
    inputs = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    inputs |= {a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None}
    inputs.discard("self")
    for node in ast.walk(function):  # (names bound to an input: identity = x)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in inputs:
            inputs |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    rebound: dict[str, int] = {}  # name -> line of its first top-level binding to something other than an input
    for statement in function.body:
        if isinstance(statement, ast.Assign) and not (isinstance(statement.value, ast.Name)
                                                      and statement.value.id in inputs):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    rebound.setdefault(target.id, statement.lineno)
    return any(isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in inputs
               and not node.lineno > rebound.get(node.target.id, node.lineno) for node in ast.walk(function))
