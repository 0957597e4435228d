"""Lowering targets: names and dicts in, a TVM target dict out; unknown targets are a clear error.

"llvm" detects the host CPU and names it (``mcpu: native`` would silently compile for a generic x86 without
AVX2/AVX-512). "cuda" is reserved for the CUDA backend.

Example:
    >>> resolve_target("llvm")["kind"]   # doctest: +SKIP
    'llvm'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedTargetError

__all__ = ["SUPPORTED_TARGETS", "resolve_target"]

SUPPORTED_TARGETS = {"llvm": "x86 / ARM CPUs through LLVM (host CPU detected)",
                     "cuda": "NVIDIA GPUs (not available in this version)"}


def resolve_target(target: str | Mapping[str, Any]) -> dict[str, Any]:
    """A TVM target dict for ``target`` ("llvm", "cuda" or a dict with a supported "kind")."""
    if isinstance(target, Mapping):
        kind = target.get("kind")
        resolved = dict(target)
    elif isinstance(target, str):
        kind, resolved = target, None
    else:
        kind, resolved = None, None
    if kind not in SUPPORTED_TARGETS:
        listing = "; ".join(f"{name!r}: {what}" for name, what in SUPPORTED_TARGETS.items())
        raise UnsupportedTargetError(f"unknown target {target!r}; supported: {listing}, or a TVM target dict with "
                                     "one of those kinds")
    if kind == "cuda":
        raise UnsupportedTargetError("target 'cuda' is not available in this version of srigl_compile; use 'llvm'")
    from .cpu_target import check_llvm_target, host_llvm_target

    return host_llvm_target() if resolved is None else check_llvm_target(resolved)
