"""The one place for TVM 0.27 compiler imports: ``import_tvm()`` (the runtime side is ``runtime.tvm_runtime``).

TVM 0.27 split ``tvm.tir`` into ``tvm.tirx`` (IR) and ``tvm.s_tir`` (schedulable TIR: ``Schedule``, ``get_sblock``).

Example:
    >>> tvm = import_tvm()            # doctest: +SKIP
    >>> tvm.te, tvm.s_tir.Schedule    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import types

from ..errors import LoweringError
from ..runtime.tvm_runtime import check_ffi_version, guard_forks, install_hint, set_thread_count

__all__ = ["import_tvm"]


@functools.cache
def import_tvm() -> types.ModuleType:
    """Import TVM once, after sizing its thread pool; ``tvm.te``, ``tvm.s_tir`` and ``tvm.tirx`` are loaded too.

    Raises:
        LoweringError: apache-tvm is not installed (the message says what to install).
    """
    set_thread_count()
    try:
        import tvm
        import tvm.s_tir  # noqa: F401  (schedulable TIR lives here since 0.27)
        import tvm.te  # noqa: F401
        import tvm.tirx  # noqa: F401
    except ImportError as err:
        raise LoweringError("compiling kernels needs the full apache-tvm: " + install_hint()) from err
    check_ffi_version()
    guard_forks()
    return tvm
