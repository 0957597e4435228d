"""A module whose forward is replaced by an fx graph of it, and nothing else about it changed.

``fx.GraphModule(parent, graph)`` keeps only what the graph reads: the class becomes a GraphModule that merely
bears the old name, containers are rebuilt around the submodules the forward calls, and a submodule only a method
uses, a parameter or buffer the forward does not read, and every plain attribute (``self.out_channels``) are gone.
Code outside the forward (the model's own forward, a user's method call) then fails on them. ``traced_parent``
keeps them all: the module's class as a base of the GraphModule's (isinstance and its other methods hold), its
original child modules, unread parameters and buffers, and its plain attributes, which also ride in the
GraphModule's preserved attributes so that a deepcopy keeps them. A pickle (``save_lowered``, ``torch.save``) keeps
them too: fx rebuilds a plain GraphModule from the generated code, and the load makes it this class again (where
the class can be imported by name, as pickle needs; else the plain GraphModule, as fx gives).

Example:
    >>> rewritten = traced_parent(block, graph)    # doctest: +SKIP
    >>> isinstance(rewritten, type(block))         # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import sys

import torch.fx as fx
import torch.nn as nn

__all__ = ["traced_parent"]

# fx restores these (name -> value) on the copy a deepcopy makes (torch.fx.graph_module's key, private there)
_PRESERVED = "_user_preserved_attributes"
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@functools.cache
def _graph_module_class(base: type) -> type:
    """A GraphModule class with ``base`` after it: fx's generated forward and call come first (fx puts them on a
    subclass of this one per instance, a deepcopy's too), then GraphModule's, then ``base``'s other methods."""

    class _ModuleInitOnly(base):  # (GraphModule.__init__'s super().__init__() lands here: base's own __init__
        def __init__(self, *args, **kwargs) -> None:  # would build its layers again, or want its arguments)
            nn.Module.__init__(self)

    return type(base.__name__, (fx.GraphModule, _ModuleInitOnly),
                {"__module__": base.__module__, "__qualname__": base.__qualname__, "_traced_parent_base": base,
                 "__reduce__": _reduce_keeping_class})


def _reduce_keeping_class(module: fx.GraphModule):
    """Pickle as fx does (the generated code and the attributes), rebuilt as the module's class on load."""
    rebuild_graph_module, (body, import_block) = fx.GraphModule.__reduce__(module)
    args = ({**body, **dict(_slot_values(module))}, import_block)  # (slot values are not in the __dict__ fx keeps)
    base = module._traced_parent_base
    if not _importable(base):
        return rebuild_graph_module, args  # (pickle could not name the class: fx's plain GraphModule, as before)
    return _rebuild_traced_parent, (base, rebuild_graph_module, args)


def _rebuild_traced_parent(base: type, rebuild_graph_module, args) -> fx.GraphModule:
    plain = rebuild_graph_module(*args)
    return traced_parent(plain, plain.graph, base=base)


def _importable(cls: type) -> bool:
    """Whether pickle can name ``cls`` (its module imported, its qualified name leading back to it)."""
    found = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _slot_values(module: nn.Module) -> list[tuple[str, object]]:
    """The values of the ``__slots__`` its classes declare and it has set (not in ``vars``)."""
    names = []
    for klass in type(module).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [(name, getattr(module, name)) for name in dict.fromkeys(names)
            if name not in ("__dict__", "__weakref__") and hasattr(module, name)]


def traced_parent(parent: nn.Module, graph: fx.Graph, base: type | None = None) -> fx.GraphModule:
    """``parent`` with ``graph`` as its forward, everything else kept (module docstring); its class ``base``
    (default: the parent's)."""
    base = base or type(parent)
    try:
        rewritten = _graph_module_class(base)(parent, graph, class_name=base.__name__)
    except TypeError:  # a layout or metaclass Python cannot combine with GraphModule's: the name only, as fx gives
        rewritten = fx.GraphModule(parent, graph, class_name=base.__name__)
    extras = {}
    for name, child in parent._modules.items():  # (the originals: the trace's containers hold what it calls)
        rewritten._modules[name] = extras[name] = child
    for name, parameter in parent._parameters.items():
        if name not in rewritten._parameters:
            rewritten.register_parameter(name, parameter)
            extras[name] = parameter
    for name, buffer in parent._buffers.items():
        if name not in rewritten._buffers:
            rewritten.register_buffer(name, buffer, persistent=name not in parent._non_persistent_buffers_set)
    own = vars(rewritten)
    for name, value in [*vars(parent).items(), *_slot_values(parent)]:
        if name not in _MODULE_INTERNALS and name not in own:
            setattr(rewritten, name, value)
            extras[name] = value
    rewritten.meta[_PRESERVED] = extras
    return rewritten
