"""Shared benchmark plumbing: environment capture, medians with spread, JSON results.

Every result file records the machine, library versions, thread count and the exact command that produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import torch

    env = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    try:
        from importlib.metadata import version

        env["tvm"] = version("apache-tvm")
    except Exception:  # TVM is optional for the training benchmarks
        env["tvm"] = None
    return env


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and interquartile range of repeated measurements (seconds)."""
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "n": len(ordered)}


def save_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                 out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    with open(path, "w") as f:
        json.dump({"environment": environment(), **(extra or {}), "rows": rows}, f, indent=2)
    return path
