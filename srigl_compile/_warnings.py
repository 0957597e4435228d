"""Warnings attributed to the user's line that called into srigl_compile, not to the library frame raising them."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch.nn.modules.module
import torch.utils._contextlib

_PACKAGE = str(Path(__file__).resolve().parent)
# Frames that only pass a call on (torch's no_grad decorator, nn.Module.__call__, contextlib): skipped as well, so a
# warning from a decorated method or a module's forward names the line that called it.
_WRAPPERS = frozenset(str(Path(module.__file__).resolve())
                      for module in (torch.utils._contextlib, torch.nn.modules.module, contextlib))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside this package (3.12's
    ``skip_file_prefixes``, which Python 3.11 lacks)."""
    frame, level = sys._getframe(1), 2  # level 2: the frame that called warn_user
    while frame is not None and _passes_on(str(Path(frame.f_code.co_filename).resolve())):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _passes_on(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename in _WRAPPERS
