"""The LLVM target for the host CPU, named explicitly (``mcpu: native`` silently means a generic x86 in TVM 0.27).

Example:
    >>> host_llvm_target()                     # doctest: +SKIP
    {'kind': 'llvm', 'mcpu': 'znver3', 'num-cores': 2}
    >>> target_key(host_llvm_target())         # doctest: +SKIP
    'kind=llvm,mcpu=znver3,num-cores=2'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedTargetError
from ._tvm_compat import import_tvm, tvm_thread_count

__all__ = ["host_cpu_name", "host_llvm_target", "check_llvm_target", "target_key", "vector_registers",
           "cpu_features", "has_bit_extract", "missing_host_features"]


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for the host CPU (``znver3``, ``skylake-avx512``, ...)."""
    tvm = import_tvm()
    return str(tvm.target.codegen.llvm_get_system_cpu())


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


def target_key(target: Mapping[str, Any]) -> str:
    """A stable string naming a target dict (for kernel keys and tuning records)."""
    return ",".join(f"{k}={target[k]}" for k in sorted(target))


def cpu_features(target: Mapping[str, Any]) -> frozenset[str]:
    """LLVM's feature names for the target's CPU (its mcpu, mtriple and mattr), instruction sets and tuning flags."""
    return _features(str(target.get("mcpu")), target.get("mtriple"), tuple(target.get("mattr", ())))


@functools.cache
def _features(mcpu: str, mtriple: str | None, mattr: tuple) -> frozenset[str]:
    tvm = import_tvm()
    spec = {"kind": "llvm", "mcpu": mcpu, **({"mtriple": mtriple} if mtriple else {}),
            **({"mattr": list(mattr)} if mattr else {})}
    return frozenset(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec)))


def has_bit_extract(target: Mapping[str, Any]) -> bool:
    """Whether the target CPU has BMI1's ``bextr`` (a bit field in one instruction; x86 since Haswell / Zen)."""
    return "bmi" in cpu_features(target)


# LLVM feature names that are instruction sets (the rest are tuning flags such as "fast-gather", "slow-3ops-lea").
_ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "bmi", "amx", "vpclmul", "gfni", "vaes", "sha", "popcnt",
                 "lzcnt", "movbe", "adx", "aes", "pclmul", "tbm", "xop", "cx16", "sahf", "prfchw", "clflushopt",
                 "clwb", "rdrnd", "rdseed", "xsave", "vnni", "avxvnni", "serialize", "waitpkg")


def missing_host_features(target: Mapping[str, Any]) -> tuple[str, ...]:
    """Instruction sets the target CPU has and this machine lacks: kernels compiled for it would die here of an
    illegal instruction. Empty when they run here, or when no LLVM is at hand to ask (runtime-only TVM)."""
    try:
        here = host_cpu_name()
    except Exception:  # runtime-only TVM: no LLVM (and no compiler to have built foreign kernels with)
        return ()
    if target.get("mcpu") == here and not target.get("mattr"):
        return ()
    lacking = cpu_features(target) - cpu_features({"mcpu": here})
    return tuple(sorted(f for f in lacking if f.startswith(_ISA_PREFIXES)))


def vector_registers(asm: str) -> dict[str, int]:
    """Counts of xmm / ymm / zmm register uses in assembly text (to check that AVX2 code was generated)."""
    return {reg: len(re.findall(rf"%{reg}\d+", asm)) for reg in ("xmm", "ymm", "zmm")}
