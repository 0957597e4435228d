"""The host CPU and the instruction sets of a target CPU, asked of TVM's LLVM.

A kernel compiled for a CPU with instructions this one lacks kills the process (SIGILL) when it runs, so handles
check ``missing_host_features`` before running. The runtime-only TVM has no LLVM to ask: there the answer is
"nothing missing" (a machine without a compiler runs kernels built elsewhere for it).

Example:
    >>> host_cpu_name()                                 # doctest: +SKIP
    'znver3'
    >>> missing_host_features({"mcpu": "skylake-avx512"})   # doctest: +SKIP
    ('avx512bw', 'avx512cd', ...)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from .tvm_runtime import import_tvm_runtime

__all__ = ["host_cpu_name", "cpu_features", "missing_host_features"]


def _llvm_queries():
    """TVM's LLVM queries (``tvm.target.codegen``); they exist only in the full TVM (AttributeError otherwise)."""
    import_tvm_runtime()
    import tvm.target

    return tvm.target


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for the host CPU (``znver3``, ``skylake-avx512``, ...)."""
    return str(_llvm_queries().codegen.llvm_get_system_cpu())


def cpu_features(target: Mapping) -> frozenset[str]:
    """LLVM's feature names for the target's CPU (its mcpu, mtriple and mattr), instruction sets and tuning flags."""
    return _features(str(target.get("mcpu")), target.get("mtriple"), tuple(target.get("mattr", ())))


@functools.cache
def _features(mcpu: str, mtriple: str | None, mattr: tuple) -> frozenset[str]:
    target = _llvm_queries()
    spec = {"kind": "llvm", "mcpu": mcpu, **({"mtriple": mtriple} if mtriple else {}),
            **({"mattr": list(mattr)} if mattr else {})}
    return frozenset(target.codegen.llvm_get_cpu_features(target.Target(spec)))


# LLVM feature names that are instruction sets (the rest are tuning flags such as "fast-gather", "slow-3ops-lea").
_ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "bmi", "amx", "vpclmul", "gfni", "vaes", "sha", "popcnt",
                 "lzcnt", "movbe", "adx", "aes", "pclmul", "tbm", "xop", "cx16", "sahf", "prfchw", "clflushopt",
                 "clwb", "rdrnd", "rdseed", "xsave", "vnni", "avxvnni", "serialize", "waitpkg")


def missing_host_features(target: Mapping) -> tuple[str, ...]:
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
