"""Where a command ran and how to run it again: CPU, threads, versions, the command line, the time (written beside
every figure the CLI reports: the demo's results.json, the table's environment.json)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["environment"]


def environment() -> dict:
    """What the timings depend on and how to run them again: CPU, threads, versions, the command, when."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), None)
    except OSError:
        cpu_model = None
    try:
        tvm = version("apache-tvm")
    except PackageNotFoundError:
        tvm = None
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "tvm": tvm, "srigl_compile": __version__, "command": sys.argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
