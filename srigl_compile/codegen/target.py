"""Lowering targets: names and dicts in, a TVM target dict out; unknown targets are a clear error.

"llvm" detects the host CPU and names it (``mcpu: native`` would silently compile for a generic x86 without
AVX2/AVX-512). "cuda" builds for this machine's GPU when there is one, else machine code for sm_80 and sm_90 (A100,
H100/H200) plus PTX that newer GPUs compile when they load it; ``{"kind": "cuda", "arch": "sm_90"}`` builds for one
arch, and a ``fatbin_archs`` list adds machine code for more.

Example:
    >>> resolve_target("llvm")["kind"]   # doctest: +SKIP
    'llvm'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedTargetError

__all__ = ["SUPPORTED_TARGETS", "resolve_target"]

SUPPORTED_TARGETS = {"llvm": "x86 / ARM CPUs through LLVM (host CPU detected)",
                     "cuda": "NVIDIA GPUs (built ahead of time with nvcc; runs where CUDA is available)"}
_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


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
        return _cuda_target(resolved)
    from .cpu_target import check_llvm_target, host_llvm_target

    return host_llvm_target() if resolved is None else check_llvm_target(resolved)


def _cuda_target(given: dict[str, Any] | None) -> dict[str, Any]:
    if given is None:
        import torch

        if torch.cuda.is_available():
            arch = "sm_%d%d" % torch.cuda.get_device_capability()
            return {"kind": "cuda", "arch": arch, "fatbin_archs": [arch]}
        from .cuda_build import DEFAULT_FATBIN_ARCHS

        return {"kind": "cuda", "arch": DEFAULT_FATBIN_ARCHS[0], "fatbin_archs": list(DEFAULT_FATBIN_ARCHS)}
    arch = given.get("arch")
    archs = list(given.get("fatbin_archs") or [arch])
    unknown = set(given) - {"kind", "arch", "fatbin_archs"}
    if not isinstance(arch, str) or not all(isinstance(a, str) and _ARCH.match(a) for a in [arch, *archs]):
        raise UnsupportedTargetError(f"a CUDA target needs an 'arch' such as 'sm_90' (and optional 'fatbin_archs' "
                                     f"of the same form); got {dict(given)!r}")
    if unknown:
        raise UnsupportedTargetError(f"unknown CUDA target keys {sorted(unknown)}; supported: kind, arch, "
                                     "fatbin_archs")
    return {"kind": "cuda", "arch": arch, "fatbin_archs": sorted(set([arch, *archs]))}
