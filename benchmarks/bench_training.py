"""Training overhead of SRigL against dense on the same model: step time, mask-update cost, peak memory.

    python benchmarks/bench_training.py [--hidden 2048] [--steps 60] [--threads 2] [--repeats 5]

Per-step time is the median over ``repeats`` runs of the mean step time (steps without a mask update); the
update cost is the median time of ``updater.step()`` on update steps minus that of a plain step. Peak memory is
the maximum resident set size of a fresh subprocess that trains each variant, so each number includes the same
torch baseline; the difference is what sparse training costs on top of dense.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import save_results, summarize  # noqa: E402

from srigl_compile import SRigLConfig, SRigLUpdater, sparsify  # noqa: E402


def build(hidden: int, variant: str, delta_t: int, total: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    config = SRigLConfig(sparsity=0.9, method="srigl", delta_t=delta_t)
    if variant != "dense":
        model = sparsify(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    updater = SRigLUpdater(model, opt, config, total_steps=total) if variant != "dense" else None
    return model, opt, updater


def run(hidden: int, variant: str, steps: int, batch: int, delta_t: int):
    """Returns (plain step times, update-step extra times of updater.step())."""
    model, opt, updater = build(hidden, variant, delta_t, total=10 * steps)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    plain, updates = [], []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        middle = time.perf_counter()
        updated = updater.step() if updater else False
        end = time.perf_counter()
        (updates.append(end - middle) if updated else plain.append(end - start))
    return plain, updates


def peak_rss_mb(hidden: int, variant: str, steps: int, batch: int, delta_t: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_training as b; "
            f"b.run({hidden}, {variant!r}, {steps}, {batch}, {delta_t}); import resource; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--delta-t", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for variant in ("dense", "srigl"):
        means, update_costs = [], []
        for _ in range(args.repeats):
            plain, updates = run(args.hidden, variant, args.steps, args.batch, args.delta_t)
            plain = plain[3:]  # warm-up
            means.append(sum(plain) / len(plain))
            update_costs.extend(updates)
        row = {"variant": variant, "step": summarize(means),
               "update_extra": summarize(update_costs) if update_costs else None,
               "peak_rss_mb": peak_rss_mb(args.hidden, variant, args.delta_t * 2 + 2, args.batch, args.delta_t)}
        rows.append(row)
    dense, srigl = rows
    ratio = srigl["step"]["median"] / dense["step"]["median"]
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, batch {args.batch}, SGD momentum, {args.threads} threads, "
          f"90% sparse (ERK), delta_t={args.delta_t}")
    print(f"{'variant':<8} {'step ms (median)':>17} {'IQR ms':>15} {'peak RSS MB':>12}")
    for r in rows:
        s = r["step"]
        print(f"{r['variant']:<8} {s['median'] * 1e3:>17.2f} {s['p25'] * 1e3:>7.2f}-{s['p75'] * 1e3:<7.2f} "
              f"{r['peak_rss_mb']:>12.1f}")
    print(f"SRigL step / dense step: {ratio:.3f}x")
    print(f"one mask update (extra time of updater.step()): {srigl['update_extra']['median'] * 1e3:.1f} ms median "
          f"= {srigl['update_extra']['median'] / dense['step']['median']:.1f} dense steps, amortised over delta_t="
          f"{args.delta_t}: +{srigl['update_extra']['median'] / args.delta_t / dense['step']['median']:.1%} per step")
    n_weights = 784 * args.hidden + args.hidden * args.hidden + args.hidden * 10
    print(f"weights: {n_weights * 4 / 2**20:.1f} MB fp32; bool masks {n_weights / 2**20:.1f} MB; "
          f"peak RSS difference {srigl['peak_rss_mb'] - dense['peak_rss_mb']:.1f} MB")
    path = save_results("training_overhead", rows, {"args": vars(args), "step_ratio": ratio})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
