"""What fused epilogues buy, in one process: one sparse model lowered with and without ``fuse_epilogues``.

    python benchmarks/fusion_ab.py --model vit_b16 [--batch 1] [--rounds 8] [--calls 5]

``ab.py`` compares two revisions in fresh processes; on this VM whole-model times of fresh processes differ by
5-10% (memory placement, neighbours), which can hide a change of that size. Here both lowerings share one process,
one masked model and one input: rounds alternate which goes first, and each round times ``--calls`` forwards of
each. Prints the median and minimum of the round means and the largest output difference, and writes
``fusion_ab_<model>_b<batch>.json`` (machine, versions, command, every round) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py: torch's spinning threads starve TVM's pool
sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as model_bench  # noqa: E402
import torch  # noqa: E402
from common import environment, set_threads  # noqa: E402

from srigl_compile import lower  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16", choices=sorted(model_bench.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    set_threads(args.threads)
    built = model_bench.build(model_bench.MODELS[args.model], args.resolution)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    variants = {"fused": built["lowered"],
                "unfused": lower(built["masked"], example_inputs=x, progress=False, fuse_epilogues=False)}
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        difference = float((variants["fused"](x) - variants["unfused"](x)).abs().max())
        for round_ in range(args.rounds):
            for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
                variants[name](x)
                start = time.perf_counter()
                for _ in range(args.calls):
                    variants[name](x)
                rounds[name].append((time.perf_counter() - start) / args.calls * 1e3)
    summary = {name: {"median_ms": statistics.median(times), "min_ms": min(times)} for name, times in rounds.items()}
    for stat in ("median_ms", "min_ms"):
        fused, unfused = summary["fused"][stat], summary["unfused"][stat]
        print(f"{args.model} B={args.batch}, {stat.removesuffix('_ms')} of {args.rounds} rounds: unfused "
              f"{unfused:.4g} ms, fused {fused:.4g} ms ({unfused / fused:.2f}x)")
    print(f"largest output difference {difference:.3g}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fusion_ab_{args.model}_b{args.batch}.json"
    path.write_text(json.dumps({"environment": environment(), "summary": summary, "rounds": rounds,
                                "max_abs_difference": difference}, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
