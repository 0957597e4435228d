"""Warnings attributed to the user's line that called into srigl_compile, not to the library frame raising them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside this package (3.12's
    ``skip_file_prefixes``, which Python 3.11 lacks)."""
    frame, level = sys._getframe(1), 2  # level 2: the frame that called warn_user
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
