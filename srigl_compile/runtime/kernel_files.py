"""Files of a kernel folder: folder checks, SHA-256s, and the error a missing, corrupt or mismatched file raises.

Example:
    >>> folder = as_folder("out/kernels", "export_kernels writes a folder")     # doctest: +SKIP
    >>> library = checked_file(folder, entry["file"], entry["sha256"])          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["KernelFileError", "as_folder", "sha256", "checked_file"]


class KernelFileError(CheckpointError):
    """A kernel folder is missing, corrupt, from another format, or does not match its manifest."""


def as_folder(path: str | os.PathLike, what: str, error: type[CheckpointError] = KernelFileError) -> Path:
    """``path`` as a folder to read or write: a file at it (or at a parent) is ``error`` saying ``what`` the path
    must be, rather than the NotADirectoryError / FileExistsError of the first file operation."""
    folder = Path(path)
    try:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    except OSError as err:  # (a name too long, a folder that cannot be listed)
        raise error(f"cannot use the path {folder}: {err.strerror or err}; {what}") from None
    if blocking is not None:
        raise error(f"{blocking} is a file, not a folder: {what}; pass a folder path")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_file(folder: Path, name: str, expected: str) -> Path:
    """``folder / name``, which must exist and have the SHA-256 the manifest recorded."""
    file = folder / name
    if not file.is_file():
        raise KernelFileError(f"kernel file {file} is missing")
    if sha256(file) != expected:
        raise KernelFileError(f"kernel file {file} does not match its manifest (corrupt or replaced)")
    return file
