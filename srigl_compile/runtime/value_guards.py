"""Values a recorded forward reads into Python, kept as guards among its calls (``runtime.call_record``).

``.item()``, ``bool(tensor)`` and ``torch.equal`` reach the dispatcher, which the recorder sees;
``Tensor.tolist`` and ``Tensor.numpy`` read memory without it, so while a forward is recorded they are wrapped to
say what they read (``reading_contents``). Each read becomes a ``Guard``: a replay computes the value again where
it was read and compares it with the recorded one (``same_value``: NaN equals NaN, tensors element by element),
raising ``GuardFailed`` on another value, since the forward may decide otherwise on it. A read that gives no plain
number (a custom op returning a list) is refused with ``value_read``'s error, which names the model's source line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten

from ..errors import ReplayError
from .liveness import Access, extents

__all__ = ["GuardFailed", "Guard", "same_value", "contents", "reading_contents", "value_read"]


class GuardFailed(Exception):
    """A replay read another value than its recording did (module docstring): run the call eagerly."""


@dataclasses.dataclass
class Guard:
    """A value the forward read into Python: ``fn(*args, **kwargs)`` computed again at a replay and compared with
    ``value``, the recorded one."""

    fn: Callable
    args: tuple
    kwargs: dict
    value: Any
    kernel: ClassVar[bool] = False  # (a recorded call's attribute: a guard is no kernel)

    def access(self) -> Access:
        """It reads its tensors and writes nothing (``runtime.liveness``)."""
        return Access(extents(t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor)))

    def __call__(self) -> None:
        value = self.fn(*self.args, **self.kwargs)
        if not same_value(value, self.value):
            raise GuardFailed(f"{self.fn} read {value!r}, recorded {self.value!r}")


def same_value(now: Any, then: Any) -> bool:
    """Equal values of one type, NaN equal to NaN (the forward decided the same on both); tensors (contents read
    by ``.tolist()`` / ``.numpy()``) element by element."""
    if isinstance(then, torch.Tensor):
        if now.shape != then.shape or now.dtype != then.dtype:
            return False
        if now.is_floating_point() or now.is_complex():
            return bool(((now == then) | (now.isnan() & then.isnan())).all())
        return torch.equal(now, then)
    if type(now) is not type(then):
        return False
    return now == then or (isinstance(now, (float, complex)) and now != now and then != then)


def contents(tensor: torch.Tensor) -> torch.Tensor:
    """A guard's ``fn`` for values read without the dispatcher: the tensor itself, compared whole."""
    return tensor


@contextlib.contextmanager
def reading_contents(note: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Meanwhile, ``Tensor.tolist`` and ``Tensor.numpy`` call ``note(tensor)`` before reading it."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def noting(original):
        def read(tensor, *args, **kwargs):
            note(tensor)
            return original(tensor, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, noting(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def value_read(func) -> ReplayError:
    """The error for a value read that no guard can hold, naming the model's line that read it."""
    where = _caller_line()
    return ReplayError(f"the forward reads a tensor's value into Python ({func}{', at ' + where if where else ''}: "
                       "e.g. .item() or bool(tensor)), a decision a replay would not make again; run this model "
                       "eagerly")


_LIBRARY_DIR = str(Path(__file__).resolve().parents[1])


def _caller_line() -> str:
    """The innermost line of the model's own code on the stack (outside torch, Python's libraries and this
    package): where a value was read, which the op's name alone does not say (it may sit in a library's masks)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if (name.startswith(_LIBRARY_DIR) or f"{os.sep}torch{os.sep}" in name or name.startswith("<")
                or name.startswith(sysconfig.get_paths()["stdlib"])):
            continue
        return f"{name}:{frame.lineno}: {frame.line}"
    return ""
