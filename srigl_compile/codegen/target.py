"""Lowering targets: a name, "kind:arch", a dict or a config in; a checked config and its backend out.

    "llvm"                      the host CPU, detected and named (``mcpu: native`` would silently compile for a
                                generic x86 without AVX2/AVX-512)
    "cuda"                      this machine's GPU when there is one, else machine code for sm_80 and sm_90 + PTX
    "cuda:sm_90"                one arch: {"kind": "cuda", "arch": "sm_90"}
    {"kind": ..., ...}          a TVM target dict of a supported kind
    LlvmConfig(...), CudaConfig(...)   a backend's frozen config (``codegen.backends``)

Unknown targets are ``UnsupportedTargetError`` listing the supported kinds.

Example:
    >>> parse_target("cuda:sm_90")
    ('cuda', {'kind': 'cuda', 'arch': 'sm_90'})
    >>> resolve_target("llvm")["kind"]   # doctest: +SKIP
    'llvm'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import LoweringError, UnsupportedTargetError
from .backends import BACKENDS, Backend, TargetConfig

__all__ = ["SUPPORTED_TARGETS", "parse_target", "resolve_target", "lowering_config"]

SUPPORTED_TARGETS = {kind: backend.description for kind, backend in BACKENDS.items()}
# lower()'s keyword options and their defaults (a config object carries its own)
OPTION_DEFAULTS = {"tune": False, "cache_dir": None, "col_threshold": None, "progress": True,
                   "dtype": torch.float32}


def parse_target(target: str | Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(kind, the target dict given, or None for the kind's default).

    Raises:
        UnsupportedTargetError: not a supported kind (the message lists them).
    """
    if isinstance(target, Mapping):
        kind, given = target.get("kind"), dict(target)
    elif isinstance(target, str):
        kind, _, arch = target.partition(":")
        given = {"kind": kind, "arch": arch} if arch else None
    else:
        kind, given = None, None
    if kind not in BACKENDS:
        listing = "; ".join(f"{name!r}: {what}" for name, what in SUPPORTED_TARGETS.items())
        raise UnsupportedTargetError(f"unknown target {target!r}; supported: {listing}, or a TVM target dict with "
                                     "one of those kinds")
    return kind, given


def resolve_target(target: str | Mapping[str, Any]) -> dict[str, Any]:
    """A checked TVM target dict for ``target`` ("llvm", "cuda", "cuda:sm_90" or a dict of a supported kind)."""
    kind, given = parse_target(target)
    return BACKENDS[kind].resolve_target(given)


def lowering_config(target: str | Mapping[str, Any] | TargetConfig, **options) -> tuple[Backend, TargetConfig]:
    """The backend and checked config for ``lower(model, target, **options)``.

    Raises:
        UnsupportedTargetError: an unknown target. LoweringError: a dtype or option the backend does not have,
            or a config given together with keyword options (they belong in the config).
    """
    if isinstance(target, TargetConfig):
        given = sorted(name for name, value in options.items() if value != OPTION_DEFAULTS[name])
        if given:
            raise LoweringError(f"lower() got a {type(target).__name__} and the options {given}: set them in the "
                                "config")
        backend = BACKENDS[target.kind]
        return backend, backend.checked(target)
    kind, given = parse_target(target)
    backend = BACKENDS[kind]
    return backend, backend.config(given, **options)
