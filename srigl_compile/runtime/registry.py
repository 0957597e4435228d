"""The process-wide kernel registry: key -> handle. Lowered layers hold only a key (a string the graph can carry
and torch.save can pickle); the operators look the handle up here on every call. A key names one compiled variant
for good: another variant of the same shape, built or loaded, is registered beside it as ``key#2``, ``#3``, ...
(``variant_key``), since the layers already lowered with the first hold operands packed for it.

Example:
    >>> register_handle(handle)          # doctest: +SKIP   (what building a kernel does; loading: register_loaded)
    >>> get_handle(handle.key) is handle  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..errors import LoweringError

__all__ = ["register_handle", "register_loaded", "variant_key", "get_handle", "get_registered", "registered_handles",
           "wrapped_functions"]

_HANDLES: dict = {}  # key -> handle (runtime.handle.KernelHandle)


def register_handle(handle):
    _HANDLES[handle.key] = handle
    return handle


def variant_key(key: str, same_variant: Callable[[Any], bool]) -> tuple[str, Any]:
    """(key, handle): the handle registered under ``key`` or a ``key#n`` for which ``same_variant(handle)``, else (a
    free key, None). A shape built or loaded again with other variants (another tuning record, another cache_dir,
    another machine's) gets ``key#2``, ``#3``, ...: replacing the handle under ``key`` would leave the layers
    already lowered with operands packed for the old variant."""
    candidate, n = key, 1
    while (existing := get_registered(candidate)) is not None:
        if same_variant(existing):
            return candidate, existing
        n += 1
        candidate = f"{key}#{n}"
    return candidate, None


def register_loaded(handle):
    """Register a handle loaded from a file and return the one registered for it: this process's handle of the
    same variant under the same key (or ``key#n``) unless the loaded one can run more (a library saved before
    some glue existed lacks it: the two run the same kernels on the same packed operands); else the loaded
    handle, under its key or, when this process has another variant there, the next free ``key#n`` (layers
    that name the saved key must be renamed: ``serialization.load_lowered`` does). A ``legacy`` library (an older
    version's, whose calls return other layouts) goes under ``key#legacy``: a key names what its calls return,
    in every process, which torch.compile's on-disk caches assume (they hold the traced output strides)."""
    def same_variant(other) -> bool:
        return type(other) is type(handle) and other.variant() == handle.variant()

    key, existing = variant_key(handle.key, same_variant)
    if existing is not None and not handle.capabilities() > existing.capabilities():
        return existing
    if handle.legacy():
        key, existing = variant_key(f"{handle.key}#legacy", same_variant)
        if existing is not None:
            return existing
    handle.key = key
    return register_handle(handle)


def get_registered(key: str):
    """The handle registered under ``key``, or None."""
    return _HANDLES.get(key)


def get_handle(key: str):
    """The registered handle; raises ``LoweringError`` naming the fix when this process has not built/loaded it."""
    try:
        return _HANDLES[key]
    except KeyError:
        raise LoweringError(f"compiled kernel {key!r} is not loaded in this process. A lowered model travels with "
                            "srigl_compile.save_lowered(model, path) and load_lowered(path), which carry its kernels "
                            "(torch.save alone does not); or lower the model again here") from None


def registered_handles() -> list:
    """Every handle registered in this process."""
    return list(_HANDLES.values())


@contextlib.contextmanager
def wrapped_functions(wrap: Callable[[object, str, Callable], Callable]):
    """Meanwhile, each compiled function of every registered handle (its ``*_fn`` attributes: kernels and the glue
    around them) is replaced by ``wrap(handle, name, function)``: how a recording sees the calls
    (``runtime.call_record``) and how a profile times them (``benchmarks/profile_model.py --calls``)."""
    patched = [(handle, name, fn) for handle in registered_handles() for name, fn in list(vars(handle).items())
               if name.endswith("_fn") and callable(fn)]
    for handle, name, fn in patched:
        setattr(handle, name, wrap(handle, name, fn))
    try:
        yield
    finally:
        for handle, name, fn in patched:
            setattr(handle, name, fn)
