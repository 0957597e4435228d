"""Median latency of a callable (torch.utils.benchmark's blocked_autorange), in microseconds."""

from __future__ import annotations

from torch.utils import benchmark


def median_us(fn, threads: int = 2, min_run_time: float = 0.3) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6
