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
    or on a name ever bound to one), which its fx trace records as an out-of-place op (fx proxies have no
    ``__iadd__``): a caller reading that tensor afterwards would see other values. A name rebound in between
    still counts (``x = x.contiguous()`` may hand back the input itself). True when the source cannot be read."""
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
    grown = True
    while grown:  # (names bound to an input, or to such a name: identity = x; a, b = x, y; y: Tensor = x)
        before = len(inputs)
        for node in ast.walk(function):
            for target, value in _bindings(node):
                if isinstance(target, ast.Name) and isinstance(value, ast.Name) and value.id in inputs:
                    inputs.add(target.id)
        grown = len(inputs) > before
    return any(isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in inputs
               for node in ast.walk(function))


def _bindings(node: ast.AST):
    """(target, value) pairs an assignment binds, tuples unpacked element by element."""
    if isinstance(node, ast.Assign):
        pairs = [(target, node.value) for target in node.targets]
    elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
        pairs = [(node.target, node.value)]
    else:
        return
    for target, value in pairs:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(value.elts):
            yield from zip(target.elts, value.elts)
        else:
            yield target, value
