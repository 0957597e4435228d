"""Where a lowered model's forward goes outside its sparse kernels: torch.profiler's aten operators, per forward.

    python benchmarks/profile_model.py --model resnet50 --batch 1 [--forwards 5] [--top 15]

Builds the model as the model benchmark does (sparsify + ``lower`` with example inputs), runs warm-up forwards,
then profiles ``--forwards`` of them and prints the aten operators by self CPU time, divided per forward. The TVM
kernels themselves are not aten operators and do not appear: what is listed is the glue around them (padding,
cropping and phase-split copies, activations, residual adds, pooling).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import models as model_bench  # noqa: E402
from common import set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(model_bench.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS[args.model], args.resolution)["lowered"]
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    with torch.no_grad():
        for _ in range(3):
            lowered(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.forwards):
                lowered(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.forwards / 1e3
    print(f"{args.model} B={args.batch}: aten self CPU time {total:.1f} ms a forward (kernels not included)")
    for event in events[: args.top]:
        print(f"  {event.key:36s} {event.self_cpu_time_total / args.forwards / 1e3:7.2f} ms  "
              f"{event.count // args.forwards:5d} calls")


if __name__ == "__main__":
    main()
