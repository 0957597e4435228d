"""The one place for TVM 0.27 namespace shims and runtime set-up.

TVM 0.27 split ``tvm.tir`` into ``tvm.tirx`` (IR) and ``tvm.s_tir`` (schedulable TIR: ``Schedule``, ``get_sblock``).
Its CPU thread pool sizes itself once, on first use, to half the cores on x86; ``import_tvm`` sets
``TVM_NUM_THREADS`` before that happens.

Example:
    >>> tvm = import_tvm()            # doctest: +SKIP
    >>> tvm.te, tvm.s_tir.Schedule    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import types

from ..errors import LoweringError

__all__ = ["import_tvm", "tvm_thread_count", "EXPECTED_TVM_FFI"]

log = logging.getLogger(__name__)

EXPECTED_TVM_FFI = "0.1.14.post1"  # 0.1.15.post2 segfaults when TVM serialises IR to JSON (see TVM.md)


def tvm_thread_count() -> int:
    """Threads for TVM's pool: torch's intra-op thread count, capped by the physical cores."""
    import torch

    threads = torch.get_num_threads()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or threads
    except ImportError:
        physical = os.cpu_count() or threads
    return max(1, min(threads, physical))


def _check_ffi_version() -> None:
    try:
        from importlib.metadata import version

        found = version("apache-tvm-ffi")
    except Exception:  # metadata missing in odd installs: not worth failing for
        return
    if found != EXPECTED_TVM_FFI:
        log.warning("apache-tvm-ffi %s found; srigl_compile is tested with %s (newer builds crash in JSON "
                    "serialisation)", found, EXPECTED_TVM_FFI)


@functools.cache
def import_tvm() -> types.ModuleType:
    """Import TVM once, after sizing its thread pool; ``tvm.te``, ``tvm.s_tir`` and ``tvm.tirx`` are loaded too.

    Raises:
        LoweringError: apache-tvm is not installed (the message says what to install).
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(tvm_thread_count()))
    try:
        import tvm
        import tvm.s_tir  # noqa: F401  (schedulable TIR lives here since 0.27)
        import tvm.te  # noqa: F401
        import tvm.tirx  # noqa: F401
    except ImportError as err:
        raise LoweringError(
            "srigl_compile.codegen needs apache-tvm: pip install 'srigl-compile[tvm]' "
            f"(apache-tvm==0.27.0.post1 with apache-tvm-ffi=={EXPECTED_TVM_FFI})"
        ) from err
    _check_ffi_version()
    return tvm
