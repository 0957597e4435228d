"""Importing TVM for loading and running kernels, and sizing its thread pool first.

TVM's CPU thread pool sizes itself once, on first use, to half the cores on x86; ``TVM_NUM_THREADS`` is set before
that happens (here and in ``codegen._tvm_compat.import_tvm``, which imports the compiler on top).

A process forked after its kernels ran (a DataLoader worker, a pre-forking server's worker) inherits a pool whose
worker threads fork did not copy: its first parallel kernel spun forever. ``guard_forks`` reconfigures the child's
pool to one thread, which runs kernels inline (a pool of two hung there too, on this TVM).

torch's OpenMP threads spin after each parallel op unless ``OMP_WAIT_POLICY`` says otherwise before Python
starts; on few cores they then take the cores TVM's pool runs the kernels on. ``check_wait_policy`` says so once,
when the first CPU kernel library loads, since nothing can change it from inside the process.

Example:
    >>> tvm = import_tvm_runtime()            # doctest: +SKIP
    >>> tvm.runtime.load_module("k.so")       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import types

from ..errors import LoweringError

__all__ = ["import_tvm_runtime", "tvm_thread_count", "set_thread_count", "check_ffi_version", "install_hint",
           "guard_forks", "check_wait_policy", "EXPECTED_TVM_FFI"]

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


def set_thread_count() -> None:
    """``TVM_NUM_THREADS`` unless the user set it: TVM reads it once, when its pool starts."""
    os.environ.setdefault("TVM_NUM_THREADS", str(tvm_thread_count()))


@functools.cache
def guard_forks() -> None:
    """After a fork, the child's TVM pool runs on one thread (module docstring); registered once, after TVM is
    imported."""
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def _one_thread_after_fork() -> None:
    import tvm_ffi

    configure = tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if configure is not None:
        configure(1, 1)  # (mode 1: the big cores, as TVM's default; 1 thread: no worker to wait for)


@functools.cache
def check_wait_policy() -> None:
    """A logged warning, once a process, where torch's OpenMP threads spin between ops (module docstring): neither
    ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` set, torch on OpenMP with more than one thread."""
    import torch

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or torch.get_num_threads() < 2 \
            or "OpenMP" not in torch.__config__.parallel_info():
        return
    log.warning("OMP_WAIT_POLICY is not set: torch's OpenMP threads spin after each op and take the cores the "
                "lowered kernels run on, which can make a lowered model several times slower (16 tokens of a lowered "
                "Llama on 2 cores: 0.09 s with PASSIVE, 0.12 s without; replayed by cpu_graph 0.08 s against 0.36 "
                "s). Start Python with OMP_WAIT_POLICY=PASSIVE (or GOMP_SPINCOUNT=20000) in its environment; "
                "setting either silences this")


def check_ffi_version() -> None:
    try:
        from importlib.metadata import version

        found = version("apache-tvm-ffi")
    except Exception:  # metadata missing in odd installs: not worth failing for
        return
    if found != EXPECTED_TVM_FFI:
        log.warning("apache-tvm-ffi %s found; srigl_compile is tested with %s (newer builds crash in JSON "
                    "serialisation)", found, EXPECTED_TVM_FFI)


def install_hint() -> str:
    return (f"pip install 'srigl-compile[tvm]' (apache-tvm==0.27.0.post1 with apache-tvm-ffi=={EXPECTED_TVM_FFI}); "
            "a GPU machine may use the runtime-only bundle of scripts/build_gpu_bundle.py instead")


@functools.cache
def import_tvm_runtime() -> types.ModuleType:
    """Import only what loading and running compiled kernels needs (works with the runtime-only TVM package,
    ``TVM_USE_RUNTIME_LIB=1``).

    Raises:
        LoweringError: TVM is not installed.
    """
    set_thread_count()
    try:
        import tvm
        import tvm.runtime  # noqa: F401
    except ImportError as err:
        raise LoweringError("running compiled kernels needs TVM: " + install_hint()) from err
    check_ffi_version()
    guard_forks()
    return tvm
