"""Where a run happened and how to run it again: CPU, threads and their settings, versions, the command line, the
time, the load. The one description of the machine, written beside every figure: the demo's results.json, the
table's environment.json, and every benchmark's JSON (``benchmarks/common.py`` adds the commit, GPU and peers)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["environment", "machine_line", "cpu_name"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str:
    """The command line as a shell would take it again (a script's path relative to the working directory)."""
    program = sys.argv[0]
    if program and Path(program).is_file():
        program = os.path.relpath(program)
    return shlex.join([program, *sys.argv[1:]])


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """What timings depend on and how to run them again (nothing here imports TVM or touches CUDA)."""
    import torch

    from . import __version__

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "tvm": _installed("apache-tvm"),
        "srigl_compile": __version__,
        "command": _command(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(machine: dict) -> str:
    """One line naming where and with what a run ran (older demo results hold torch and threads only, or the CPU's
    name as cpu_model)."""
    parts = [machine.get("cpu_model") or machine.get("cpu"), f"{machine['threads']} threads",
             f"torch {machine['torch']}", machine.get("tvm") and f"TVM {machine['tvm']}",
             machine.get("srigl_compile") and f"srigl_compile {machine['srigl_compile']}", machine.get("date")]
    return ", ".join(part for part in parts if part)
