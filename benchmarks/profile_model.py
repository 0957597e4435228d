"""Where a lowered model's forward goes: torch's glue around the kernels, and each kernel's efficiency.

    python benchmarks/profile_model.py --model resnet50 --batch 1 [--forwards 5] [--top 15]
    python benchmarks/profile_model.py --model resnet50 --batch 1 --layers [--json out.json]

Builds the model as the model benchmark does (sparsify + ``lower`` with example inputs) and runs warm-up forwards.
Default: profiles ``--forwards`` forwards and prints the aten operators by self CPU time, divided per forward. The
TVM kernels themselves are not aten operators and do not appear: what is listed is the glue around them (padding,
cropping and phase-split copies, activations, residual adds, pooling).

``--layers``: times each lowered layer's call (its padding and crop included) over ``--forwards`` forwards and
prints its useful GFLOP/s (2 x active neurons x k x output positions, the multiply-adds the kernel must do) against
the machine's measured fp32 peak: torch's sgemm (oneDNN / MKL) on 2048^3 at the same threads, the most a dense
kernel reaches here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as model_bench  # noqa: E402
import torch  # noqa: E402
from common import environment, set_threads  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from srigl_compile.nn.dense_fallback import settle  # noqa: E402
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear  # noqa: E402


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
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS[args.model], args.resolution)["lowered"]
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    if args.layers:
        layer_table(lowered, x, args)
        return
    with torch.no_grad():
        for _ in range(3):
            lowered(x)
        settle(lowered, x)  # (its layers' dense-form trials at this shape end first)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.forwards):
                lowered(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.forwards / 1e3
    print(f"{args.model} B={args.batch}: aten self CPU time {total:.1f} ms a forward (kernels not included)")
    for event in events[: args.top]:
        print(f"  {event.key:36s} {event.self_cpu_time_total / args.forwards / 1e3:7.2f} ms  "
              f"{event.count // args.forwards:5d} calls")


def sgemm_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The best of ``repeats`` fp32 matrix products of ``size``^3 by torch at its current threads, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _useful_flops(layer, out: torch.Tensor) -> float:
    """2 x active neurons x k x output positions (rows of x for a Linear)."""
    positions = out.numel() // out.shape[1] if isinstance(layer, LoweredConv) else out.numel() // out.shape[-1]
    return 2.0 * layer.n_active * layer.k * positions


def layer_table(lowered: torch.nn.Module, x: torch.Tensor, args) -> None:
    layers = {name: m for name, m in lowered.named_modules() if isinstance(m, (LoweredConv, LoweredLinear))}
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    flops: dict[str, float] = {}
    started: dict[str, float] = {}

    def before(name):
        return lambda module, inputs: started.__setitem__(name, time.perf_counter())

    def after(name):
        def hook(module, inputs, out):
            seconds[name].append(time.perf_counter() - started[name])
            flops[name] = _useful_flops(module, out)
        return hook

    with torch.no_grad():
        for _ in range(3):
            lowered(x)
        settle(lowered, x)  # (its layers' dense-form trials at this shape end first)
        hooks = [h for name, m in layers.items()
                 for h in (m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name)))]
        total = [_seconds(lambda: lowered(x)) for _ in range(args.forwards)]
        for hook in hooks:
            hook.remove()
        peak = sgemm_peak_gflops()
    rows = []
    for name, layer in layers.items():
        median = statistics.median(seconds[name])
        rows.append({"layer": name, "kind": type(layer).__name__, "n_active": layer.n_active, "k": layer.k,
                     "kernel": layer.kernel_key.split("@")[0], "ms": median * 1e3,
                     "gflops": flops[name] / median / 1e9, "of_peak": flops[name] / median / 1e9 / peak})
    in_layers = sum(r["ms"] for r in rows)
    forward = statistics.median(total) * 1e3
    useful = sum(flops.values()) / 1e9
    print(f"{args.model} B={args.batch}: forward {forward:.1f} ms, {in_layers:.1f} ms in {len(rows)} lowered layers "
          f"({useful:.2f} useful GFLOP: {useful / in_layers * 1e3:.1f} GFLOP/s); sgemm peak {peak:.0f} GFLOP/s "
          f"at {torch.get_num_threads()} threads")
    for row in sorted(rows, key=lambda r: -r["ms"])[: args.top]:
        print(f"  {row['layer']:24s} {row['kernel']:36s} {row['ms']:7.3f} ms {row['gflops']:7.1f} GFLOP/s "
              f"{100 * row['of_peak']:5.1f}% of peak")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "environment": environment(),
                                         "forward_ms": forward, "layers_ms": in_layers, "useful_gflop": useful,
                                         "sgemm_peak_gflops": peak, "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
