"""The LLVM target for the host CPU, named explicitly (``mcpu: native`` silently means a generic x86 in TVM 0.27),
and checks of llvm target dicts. (Which instruction sets a CPU has: ``runtime.cpu_features``.)

Example:
    >>> host_llvm_target()                     # doctest: +SKIP
    {'kind': 'llvm', 'mcpu': 'znver3', 'num-cores': 2}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedTargetError
from ..runtime.cpu_features import cpu_features, host_cpu_name
from ..runtime.tvm_runtime import tvm_thread_count
from ._tvm_compat import import_tvm

__all__ = ["host_llvm_target", "check_llvm_target", "vector_registers", "has_bit_extract"]


def host_llvm_target(num_cores: int | None = None) -> dict[str, Any]:
    """``{"kind": "llvm", "mcpu": <host cpu>, "num-cores": n}``; n defaults to TVM's thread count.

    Raises:
        UnsupportedTargetError: LLVM does not know the host CPU (pass a target dict naming one).
    """
    cpu = host_cpu_name()
    if not cpu or cpu == "generic":
        raise UnsupportedTargetError("could not detect the host CPU; pass a target dict such as "
                                     "{'kind': 'llvm', 'mcpu': 'znver3', 'num-cores': 2}")
    return {"kind": "llvm", "mcpu": cpu, "num-cores": int(num_cores or tvm_thread_count())}


def check_llvm_target(target: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a target dict for the CPU kernels (``None`` means the host); returns a plain dict copy.

    Raises:
        UnsupportedTargetError: not an llvm target, a key TVM's llvm target does not take, or ``mcpu='native'``
            (compiles for a generic CPU).
    """
    if target is None:
        return host_llvm_target()
    if not isinstance(target, Mapping) or target.get("kind") != "llvm":
        raise UnsupportedTargetError(f"the CPU kernels need an llvm target dict, got {target!r}; "
                                     "use None for the host CPU or {'kind': 'llvm', 'mcpu': ..., 'num-cores': ...}")
    known = import_tvm().target.TargetKind.options_from_name("llvm")
    unknown = sorted(set(target) - set(known))
    if unknown:
        raise UnsupportedTargetError(f"unknown llvm target key(s) {unknown}; TVM's llvm target takes "
                                     f"{', '.join(known)}")
    if target.get("mcpu") in (None, "native"):
        raise UnsupportedTargetError("name the CPU in the target ('mcpu': 'znver3', ...): 'native' or no mcpu "
                                     "compiles for a generic x86 without AVX2; host_llvm_target() detects it")
    cores = target.get("num-cores", 1)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise UnsupportedTargetError(f"the target's 'num-cores' must be a positive integer, got {cores!r}")
    codegen = import_tvm().target.codegen
    triple = target.get("mtriple") or str(codegen.llvm_get_system_triple())
    if not codegen.llvm_is_valid_cpu(str(target["mcpu"]), triple):
        raise UnsupportedTargetError(f"LLVM does not know the CPU {target['mcpu']!r} (for {triple}); it would build "
                                     f"for a generic CPU. Name one LLVM knows ('znver3', 'skylake-avx512', ...); "
                                     f"this machine is {host_cpu_name()!r}")
    return dict(target)


def has_bit_extract(target: Mapping[str, Any]) -> bool:
    """Whether the target CPU has BMI1's ``bextr`` (a bit field in one instruction; x86 since Haswell / Zen)."""
    return "bmi" in cpu_features(target)


def vector_registers(asm: str) -> dict[str, int]:
    """Counts of xmm / ymm / zmm register uses in assembly text (to check that AVX2 code was generated)."""
    return {reg: len(re.findall(rf"%{reg}\d+", asm)) for reg in ("xmm", "ymm", "zmm")}
