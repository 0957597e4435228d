"""A near-dense lowered layer's dense path under torch.compile: ``torch.ops.srigl_compile.dense_form``.

    dense_form(Tensor x, Tensor? residual, str layer_key) -> Tensor

Eager calls choose per input shape between a layer's kernel and its dense form (``nn.dense_fallback``); until now
torch.compile always traced the kernel, so a layer whose dense form measured faster ran slower compiled than
eager. Compiled, the choices made by then are followed (settle the model on its shapes before compiling, as a
server does at start-up: ``nn.settle.settle``): a shape whose choice is dense traces one call of this operator,
every other shape the kernel as before. Dynamo guards on the choice it read, so a choice made or changed later
compiles the layer again. A graph traced for dynamic shapes (``dynamic=True``, ``mark_dynamic``, or torch's
automatic dynamic after a second size) runs the kernel: choices are per concrete shape. Each model with a dense
choice gets graphs of its own (the graph names its layers): past ``torch._dynamo.config.recompile_limit`` models
of one class, the further ones run eagerly (``fullgraph=True``: an error).

An operator, not F.linear traced on the form's dense weight: that weight is a copy of the layer's operands, and a
traced graph cannot check that the copy is current (a tensor's version counter is data dependent to dynamo). At
each call the operator finds its layer (``layer_key``, registered when traced; a weak reference) and checks the
form the way eager calls do: if the layer's operands were changed in place or replaced since the form was made
(``load_state_dict`` into a compiled model), the form is dropped and the layer's kernel computes the call
(made contiguous: what the operator's fake promised). So a compiled model is never computed from stale weights.

torch.export and fx tracing keep the kernel: an exported program must not call back into this process's layers.
The operator returns a new contiguous float32 tensor; the layer's epilogue and residual are in it.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..runtime.checks import register_fake
from .dense_fallback import DenseForm, form_takes, operands_of

__all__ = ["traced_dense_choice", "dense_form"]

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # layer_key -> lowered layer
_KEYS = itertools.count()


def traced_dense_choice(layer, x: torch.Tensor, residual: torch.Tensor | None) -> DenseForm | None:
    """While torch.compile traces ``layer`` (not export, not fx): its dense form if that is the choice made for
    this input's shape (and the form takes the call); else None, the kernel's path."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    # getattr, not __dict__.get: dynamo guards on it, so a graph traced for a layer without a form (or another
    # choice) is not reused for one with (graphs are shared by modules of one class)
    form = getattr(layer, "_dense_form", None)
    if form is None:
        return None
    # Compared without guards (statically_known_true): a dynamic size matches no shape, so a graph traced for
    # dynamic shapes runs the kernel rather than being specialized to one size per dense choice.
    for (shape, residual_shape), dense in form.choices.items():
        if dense and _same(x.shape, shape) and _same(None if residual is None else residual.shape, residual_shape):
            return form if form_takes(form, x, residual) else None
    return None


def _same(traced: tuple | None, chosen: tuple | None) -> bool:
    """Whether a traced shape is known to be the chosen one without guarding on its sizes."""
    if traced is None or chosen is None:
        return traced is None and chosen is None
    return len(traced) == len(chosen) and all(statically_known_true(a == b) for a, b in zip(traced, chosen))


def dense_form(layer, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The traced call of ``layer``'s dense path (``traced_dense_choice`` said so)."""
    return torch.ops.srigl_compile.dense_form(x, residual, _registered(layer))


@torch.compiler.assume_constant_result  # (run as Python while tracing: dynamo cannot trace a weak mapping)
def _registered(layer) -> str:
    """The key under which ``layer`` is registered, registering it if it is not (its copies get their own)."""
    key = layer.__dict__.get("_traced_dense_key")
    if key is None or _LAYERS.get(key) is not layer:
        key = f"{getattr(layer, 'layer_name', '') or type(layer).__name__}#{next(_KEYS)}"
        _LAYERS[key] = layer
        layer._traced_dense_key = key
    return key


def _layer(key: str):
    layer = _LAYERS.get(key)
    if layer is None:  # (a graph outliving its model: dynamo's guards hold the module, so only a foreign graph)
        from ..errors import LoweringError

        raise LoweringError(f"dense_form: no lowered layer {key!r} in this process; the graph was traced for a "
                            "model that no longer exists: compile the model again")
    return layer


def _run(x: torch.Tensor, residual: torch.Tensor | None, layer_key: str) -> torch.Tensor:
    layer = _layer(layer_key)
    form = layer.__dict__.get("_dense_form")
    if form is not None and form.stale(operands_of(layer)):
        layer.__dict__.pop("_dense_form", None)  # (as an eager call would: the kernel reads the current operands)
        form = None
    if form is None:
        return layer.kernel_path(x, residual).contiguous()
    return form.run(x, residual).contiguous()


def _fake(x: torch.Tensor, residual: torch.Tensor | None, layer_key: str) -> torch.Tensor:
    form = _layer(layer_key).__dict__["_dense_form"]  # (traced: the form chose this path)
    if form.conv is None:
        return x.new_empty(*x.shape[:-1], form.dense_shape[0])
    shape = F.conv2d(torch.empty(x.shape, device="meta"), torch.empty(form.dense_shape, device="meta"),
                     **form.conv).shape  # (torch's own output size, whatever the padding mode's spelling)
    return x.new_empty(shape)


_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("dense_form(Tensor x, Tensor? residual, str layer_key) -> Tensor")
_LIB.impl("dense_form", _run, "CompositeExplicitAutograd")
register_fake("srigl_compile::dense_form", _LIB)(_fake)
