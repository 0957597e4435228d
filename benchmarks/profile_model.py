"""Where a lowered model's forward goes: torch's glue around the kernels, and each kernel's efficiency.

    python benchmarks/profile_model.py --model resnet50 --batch 1 [--forwards 5] [--top 15]
    python benchmarks/profile_model.py --model resnet50 --batch 1 --layers [--json out.json]
    python benchmarks/profile_model.py --model resnet50 --batch 1 --calls [--graph]

Builds the model as the model benchmark does (sparsify + ``lower`` with example inputs) and runs warm-up forwards.
Default: profiles ``--forwards`` forwards and prints the aten operators by self CPU time, divided per forward. The
TVM kernels themselves are not aten operators and do not appear: what is listed is the glue around them (padding,
cropping and phase-split copies, activations, residual adds, pooling).

``--calls``: times every call of the kernel libraries' compiled functions (kernels, pads, crops, pools; each
registered handle's ``*_fn``) inside ``--forwards`` forwards (``--graph``: forwards replayed by ``cpu_graph``) and
prints their time a forward by handle and function, then summed by function: what a forward spends in TVM, copy
by copy. Shapes of one handle (layers of one shape) are summed.

``--layers``: times each lowered layer's calls (its padding and crop included; one per batch chunk) over
``--forwards`` forwards and prints its time a forward and its useful GFLOP/s (2 x active neurons x k x output
positions, the multiply-adds the kernel must do) against the machine's measured fp32 peak: torch's sgemm (oneDNN /
MKL) on 2048^3 at the same threads, the most a dense kernel reaches here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as model_bench  # noqa: E402
import torch  # noqa: E402
from common import environment, set_threads  # noqa: E402
from layer_efficiency import layer_efficiency  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from srigl_compile import cpu_graph  # noqa: E402
from srigl_compile.nn.settle import settle  # noqa: E402
from srigl_compile.runtime.registry import wrapped_functions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(model_bench.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", action="store_true", help="per-layer time and GFLOP/s against the sgemm peak")
    parser.add_argument("--json", type=Path, help="with --layers: write the table here")
    parser.add_argument("--calls", action="store_true", help="time each compiled function's calls in the forward")
    parser.add_argument("--graph", action="store_true", help="with --calls: forwards replayed by cpu_graph")
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS[args.model], args.resolution)["lowered"]
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    if args.layers:
        layer_table(lowered, x, args)
        return
    if args.calls:
        call_table(lowered, x, args)
        return
    warm_up(lowered, x)
    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.forwards):
                lowered(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.forwards / 1e3
    print(f"{args.model} B={args.batch}: aten self CPU time {total:.1f} ms a forward (kernels not included)")
    for event in events[: args.top]:
        print(f"  {event.key:36s} {event.self_cpu_time_total / args.forwards / 1e3:7.2f} ms  "
              f"{event.count // args.forwards:5d} calls")


def warm_up(lowered: torch.nn.Module, x: torch.Tensor) -> None:
    """Warm-up forwards, then ``settle`` (its layers' dense-form trials at this shape end first)."""
    with torch.no_grad():
        for _ in range(3):
            lowered(x)
        settle(lowered, x)


def layer_table(lowered: torch.nn.Module, x: torch.Tensor, args) -> None:
    warm_up(lowered, x)
    table = layer_efficiency(lowered, x, args.forwards)
    print(f"{args.model} B={args.batch}: forward {table['forward_ms']:.1f} ms, {table['layers_ms']:.1f} ms in "
          f"{len(table['layers'])} lowered layers ({table['useful_gflop']:.2f} useful GFLOP: {table['gflops']:.1f} "
          f"GFLOP/s); sgemm peak {table['sgemm_peak_gflops']:.0f} GFLOP/s at {torch.get_num_threads()} threads")
    for row in sorted(table["layers"], key=lambda r: -r["ms"])[: args.top]:
        print(f"  {row['layer']:24s} {row['kernel']:36s} {row['ms']:7.3f} ms in {row['calls']:3.0f} calls "
              f"{row['gflops']:7.1f} GFLOP/s {100 * row['of_peak']:5.1f}% of peak")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "environment": environment(), **table},
                                        indent=1))


def call_table(lowered: torch.nn.Module, x: torch.Tensor, args) -> None:
    """Time every compiled function's calls in ``args.forwards`` forwards (module docstring, ``--calls``)."""
    warm_up(lowered, x)
    model = cpu_graph(lowered) if args.graph else lowered
    seconds, calls = collections.defaultdict(float), collections.Counter()

    def timed(handle, name, fn):
        key = (handle.key.split("@")[0], name)

        def call(*operands):
            start = time.perf_counter()
            out = fn(*operands)
            seconds[key] += time.perf_counter() - start
            calls[key] += 1
            return out
        return call

    with torch.no_grad(), wrapped_functions(timed):
        for _ in range(2):  # (a graph records its forward, with the timed functions, first)
            model(x)
        seconds.clear()
        calls.clear()
        start = time.perf_counter()
        for _ in range(args.forwards):
            model(x)
        forward = (time.perf_counter() - start) / args.forwards
    print(f"{args.model} B={args.batch}{' under cpu_graph' if args.graph else ''}: forward {forward * 1e3:.2f} ms, "
          f"{sum(seconds.values()) / args.forwards * 1e3:.2f} ms in compiled functions")
    for key, total in sorted(seconds.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {key[0]:42s} {key[1]:20s} {total / args.forwards * 1e3:7.3f} ms "
              f"{calls[key] // args.forwards:4d} calls")
    by_function = collections.defaultdict(float)
    for (_, name), total in seconds.items():
        by_function[name] += total / args.forwards * 1e3
    print("  by function (ms a forward): " + ", ".join(f"{name} {ms:.3f}" for name, ms in
                                                        sorted(by_function.items(), key=lambda item: -item[1])))


if __name__ == "__main__":
    main()
