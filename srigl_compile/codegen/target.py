"""Lowering targets: names and dicts in, a TVM target dict out; unknown targets are a clear error.

"llvm" detects the host CPU and names it (``mcpu: native`` would silently compile for a generic x86 without
AVX2/AVX-512). "cuda" is reserved for the CUDA backend.

Example:
    >>> resolve_target("llvm")["kind"]   # doctest: +SKIP
    'llvm'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedTargetError

__all__ = ["SUPPORTED_TARGETS", "resolve_target", "target_key"]

SUPPORTED_TARGETS = {"llvm": "x86 / ARM CPUs through LLVM (host CPU detected)",
                     "cuda": "NVIDIA GPUs (not available in this version)"}


def _host_llvm_target() -> dict[str, Any]:
    from ._tvm import tvm_modules

    tvm, _, _ = tvm_modules()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        raise UnsupportedTargetError("could not detect the host CPU for target='llvm'; pass a target dict such as "
                                     "{'kind': 'llvm', 'mcpu': 'skylake-avx512', 'num-cores': 4}")
    return {"kind": "llvm", "mcpu": str(cpu), "num-cores": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count()))}


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
    if resolved is None:
        return _host_llvm_target()
    if resolved.get("mcpu") == "native":
        raise UnsupportedTargetError("mcpu='native' compiles for a generic CPU in TVM 0.27; name the CPU "
                                     "(target='llvm' detects it)")
    return resolved


def target_key(target: Mapping[str, Any]) -> str:
    """A stable string naming a target dict (for kernel keys and tuning records)."""
    return ",".join(f"{k}={target[k]}" for k in sorted(target))
