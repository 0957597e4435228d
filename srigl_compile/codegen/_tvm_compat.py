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

__all__ = ["import_tvm", "import_tvm_runtime", "tvm_thread_count", "EXPECTED_TVM_FFI"]

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


_INSTALL_HINT = ("pip install 'srigl-compile[tvm]' (apache-tvm==0.27.0.post1 with apache-tvm-ffi=={ffi}); a "
                 "GPU machine may use the runtime-only bundle of scripts/build_gpu_bundle.py instead")


@functools.cache
def import_tvm_runtime() -> types.ModuleType:
    """Import only what loading and running compiled kernels needs (works with the runtime-only TVM package,
    ``TVM_USE_RUNTIME_LIB=1``).

    Raises:
        LoweringError: TVM is not installed.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(tvm_thread_count()))
    try:
        import tvm
        import tvm.runtime  # noqa: F401
    except ImportError as err:
        raise LoweringError("running compiled kernels needs TVM: " + _INSTALL_HINT.format(ffi=EXPECTED_TVM_FFI)) \
            from err
    _check_ffi_version()
    return tvm


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
        raise LoweringError("compiling kernels needs the full apache-tvm: " + _INSTALL_HINT.format(
            ffi=EXPECTED_TVM_FFI)) from err
    _check_ffi_version()
    return tvm
