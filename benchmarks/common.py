"""Shared benchmark plumbing: threads, timing with spread, environment capture, JSON results.

Every result file records the machine, library versions, thread settings and the exact command that produced it.
Used by every script here; ``python benchmarks/run.py`` is the entry point of the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_threads(threads: int) -> None:
    """Give torch and TVM the same explicit thread count (TVM reads its variable once, when its pool starts)."""
    import torch

    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class TimerConfig:
    """How each variant is timed: ``blocked_autorange(min_run_time)``, topped up with single calls until there are
    ``min_samples`` samples (a slow call fills the run time alone and would leave no spread to report)."""

    threads: int = 2
    min_run_time: float = 0.3
    min_samples: int = 3


def measure(fn: Callable[[], Any], config: TimerConfig) -> dict[str, float]:
    """Median and spread of ``fn()`` in microseconds (see ``summarize``). blocked_autorange's block-size estimate
    calls ``fn`` before any sample is kept: that is the warm-up."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=config.threads)
    samples = list(timer.blocked_autorange(min_run_time=config.min_run_time).times)
    while len(samples) < config.min_samples:
        samples.append(timer.timeit(1).median)
    return {key: value * 1e6 if key != "n" else value for key, value in summarize(samples).items()}


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and interquartile range of repeated measurements (in the samples' unit)."""
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "n": len(ordered)}


def read_bandwidth(n_bytes: int, threads: int) -> float:
    """Bytes/s of a torch sum over a float32 buffer of n_bytes (cache-resident when it fits): the denominator of
    the bandwidth bound (bytes a kernel must move / this).

    The buffer is read ``repeat`` times in one call (a stride-0 expand, so it stays cache-resident) until ~64 MiB
    pass: a single call's fixed cost (dispatch, waking passive OpenMP threads, ~0.1 ms) would otherwise dominate
    small buffers and report a few GB/s for a 0.5 MB buffer that reads at ~130 GB/s. The fastest block counts,
    not the median: a bound is the best case (and other threads, TVM's pool still spinning after a kernel, slow
    some blocks down).
    """
    import torch
    from torch.utils import benchmark

    buf = torch.randn(max(n_bytes // 4, 4096))
    repeat = max(1, (64 << 20) // (buf.numel() * 4))
    timer = benchmark.Timer(stmt="view.sum()", globals={"view": buf.expand(repeat, -1)}, num_threads=threads)
    return repeat * buf.numel() * 4 / min(timer.blocked_autorange(min_run_time=0.2).times)


@functools.lru_cache(maxsize=None)
def _git_commit() -> str | None:
    """The commit of the code this process runs ("-dirty": changed or new files git does not ignore), read once,
    when this module is first imported: a commit made while a run goes on is not what it ran."""
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


_git_commit()  # (at import: the code a run loads is the code it runs)


def _tvm_info() -> dict[str, Any]:
    try:
        from importlib.metadata import version

        info = {"tvm": version("apache-tvm")}
    except Exception:  # TVM is optional for the training benchmarks
        return {"tvm": None}
    try:
        from srigl_compile.codegen.cpu_target import host_llvm_target

        info["llvm_target"] = host_llvm_target()
    except Exception as err:  # a CPU LLVM does not know: say so rather than fail the run
        info["llvm_target"] = f"unknown ({err})"
    return info


def peer_versions() -> dict[str, str | None]:
    """Versions of the model benchmark's optional peers (the [peers] extra); None where not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """The library's description of the machine (``srigl_compile.environment``) with what only a benchmark needs:
    the commit it ran, the GPU, TVM's LLVM target and the peers' versions."""
    import torch

    from srigl_compile.environment import environment as machine

    return {**machine(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": _git_commit(), **_tvm_info(), "peers": peer_versions()}


def save_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                 out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    with open(path, "w") as f:
        json.dump({"environment": environment(), **(extra or {}), "rows": rows}, f, indent=2)
    return path


def cuda_graph_samples_us(fn, calls: int, repeats: int) -> list[float]:
    """Per-call times (microseconds) of ``fn``: ``repeats`` replays of one captured CUDA graph of ``calls`` calls,
    after warm-up on a side stream (launch gaps out; what a model captured in a graph sees)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return samples



def cuda_graph_time_us(fn, calls: int, repeats: int) -> dict[str, float]:
    """Median and quartiles (microseconds a call) of ``cuda_graph_samples_us``."""
    samples = cuda_graph_samples_us(fn, calls, repeats)
    q = statistics.quantiles(samples, n=4)
    return {"median_us": statistics.median(samples), "p25_us": q[0], "p75_us": q[2]}

@contextlib.contextmanager
def no_tf32():
    """Full float32 in cuBLAS and cuDNN, for references (cuDNN's default is TF32: ~4e-4 off)."""
    import torch

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
