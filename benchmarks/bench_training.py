"""Training overhead of SRigL against dense on the same model: step time, mask-update cost, peak memory.

    python benchmarks/bench_training.py [--hidden 2048] [--steps 60] [--threads 2] [--repeats 5]
    python benchmarks/run.py --only training        # the suite's part: this MLP and a ViT-B/16-shaped encoder

Per-step time is the median over ``repeats`` runs of the mean step time (steps without a mask update, after
``WARMUP`` steps); the update cost is the median time of ``updater.step()`` on update steps minus that of a plain
step. Peak memory is the maximum resident set size of a fresh subprocess that trains each variant, so each number
includes the same torch baseline; the difference is what sparse training costs on top of dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import save_results, set_threads, summarize  # noqa: E402

from srigl_compile import SRigLConfig, SRigLUpdater, sparsify  # noqa: E402

WARMUP = 3


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """A model to train dense and with SRigL: ``make()`` builds it (same seed both times), ``batch()`` gives
    (inputs, labels); sparsify gets ``example_inputs`` when symbolic_trace cannot capture the model."""

    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    distribution: str = "erk"
    needs_example: bool = False


def mlp_case(hidden: int, batch: int) -> TrainCase:
    def make():
        return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))

    return TrainCase(f"mlp 784-{hidden}-{hidden}-10, batch {batch}", make,
                     lambda: (torch.randn(batch, 784), torch.randint(0, 10, (batch,))))


def build(case: TrainCase, variant: str, delta_t: int, total: int):
    torch.manual_seed(0)
    model = case.make()
    config = SRigLConfig(sparsity=0.9, distribution=case.distribution, method="srigl", delta_t=delta_t)
    x, y = case.batch()
    if variant != "dense":
        model = sparsify(model, config, example_inputs=(x[:2],) if case.needs_example else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    updater = SRigLUpdater(model, opt, config, total_steps=total) if variant != "dense" else None
    return model, opt, updater, (x, y)


def run_case(case: TrainCase, variant: str, steps: int, delta_t: int):
    """Returns (plain step times, update-step extra times of updater.step())."""
    model, opt, updater, (x, y) = build(case, variant, delta_t, total=10 * steps)
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


def run(hidden: int, variant: str, steps: int, batch: int, delta_t: int):
    """The MLP's (plain step times, update extra times); what the peak-memory subprocess runs."""
    return run_case(mlp_case(hidden, batch), variant, steps, delta_t)


def compare(case: TrainCase, steps: int, delta_t: int, repeats: int) -> list[dict]:
    """A dense row and a SRigL row: step time (median over repeats of the mean plain step) and update cost."""
    rows = []
    for variant in ("dense", "srigl"):
        means, update_costs = [], []
        for _ in range(repeats):
            plain, updates = run_case(case, variant, steps, delta_t)
            plain = plain[WARMUP:] or plain
            means.append(sum(plain) / len(plain))
            update_costs.extend(updates)
        rows.append({"model": case.name, "variant": variant, "steps": steps, "delta_t": delta_t,
                     "repeats": repeats, "step": summarize(means),
                     "update_extra": summarize(update_costs) if update_costs else None})
    dense, srigl = rows
    srigl["step_ratio"] = srigl["step"]["median"] / dense["step"]["median"]
    if srigl["update_extra"]:
        srigl["update_in_dense_steps"] = srigl["update_extra"]["median"] / dense["step"]["median"]
    return rows


def vit_case(batch: int, resolution: int, quick: bool = False) -> TrainCase:
    """The model benchmark's ViT-B/16-shaped encoder (or a tiny ViT in quick mode), uniform sparsity as in the
    paper's ViT runs."""
    from srigl_compile.zoo import SmallViT, vit_b16

    shape = (3, resolution, resolution)
    make = (lambda: SmallViT(shape, 10, dim=32, depth=2, heads=2, mlp_dim=64)) if quick else \
        (lambda: vit_b16(shape, 1000))
    name = "tiny ViT" if quick else f"ViT-B/16-shaped, {resolution}x{resolution}, batch {batch}"
    classes = 10 if quick else 1000
    return TrainCase(name, make, lambda: (torch.randn(batch, *shape), torch.randint(0, classes, (batch,))),
                     distribution="uniform", needs_example=True)


def suite_rows(quick: bool) -> list[dict]:
    """The suite's training part: (case, steps, delta_t, repeats) sized for ~2 minutes on 2 cores (seconds in
    quick mode). The ViT runs at 112x112, batch 8: a 224x224 batch-64 step would take over a minute."""
    if quick:
        plan = [(mlp_case(64, 16), 10, 4, 1), (vit_case(2, 16, quick=True), 10, 4, 1)]
    else:
        plan = [(mlp_case(2048, 128), 60, 20, 3), (vit_case(8, 112), 10, 4, 2)]
    rows = []
    for case, steps, delta_t, repeats in plan:
        start = time.perf_counter()
        rows += compare(case, steps, delta_t, repeats)
        srigl = rows[-1]
        print(f"training {case.name}: SRigL step {srigl['step_ratio']:.2f}x dense, one mask update "
              f"{(srigl['update_extra'] or {}).get('median', float('nan')) * 1e3:.0f} ms "
              f"({time.perf_counter() - start:.0f} s)")
    return rows


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
    set_threads(args.threads)

    rows = compare(mlp_case(args.hidden, args.batch), args.steps, args.delta_t, args.repeats)
    for row in rows:
        row["peak_rss_mb"] = peak_rss_mb(args.hidden, row["variant"], args.delta_t * 2 + 2, args.batch, args.delta_t)
    dense, srigl = rows
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, batch {args.batch}, SGD momentum, {args.threads} threads, "
          f"90% sparse (ERK), delta_t={args.delta_t}")
    print(f"{'variant':<8} {'step ms (median)':>17} {'IQR ms':>15} {'peak RSS MB':>12}")
    for r in rows:
        s = r["step"]
        print(f"{r['variant']:<8} {s['median'] * 1e3:>17.2f} {s['p25'] * 1e3:>7.2f}-{s['p75'] * 1e3:<7.2f} "
              f"{r['peak_rss_mb']:>12.1f}")
    print(f"SRigL step / dense step: {srigl['step_ratio']:.3f}x")
    print(f"one mask update (extra time of updater.step()): {srigl['update_extra']['median'] * 1e3:.1f} ms median "
          f"= {srigl['update_in_dense_steps']:.1f} dense steps, amortised over delta_t="
          f"{args.delta_t}: +{srigl['update_in_dense_steps'] / args.delta_t:.1%} per step")
    n_weights = 784 * args.hidden + args.hidden * args.hidden + args.hidden * 10
    print(f"weights: {n_weights * 4 / 2**20:.1f} MB fp32; bool masks {n_weights / 2**20:.1f} MB; "
          f"peak RSS difference {srigl['peak_rss_mb'] - dense['peak_rss_mb']:.1f} MB")
    path = save_results("training_overhead", rows, {"args": vars(args), "step_ratio": srigl["step_ratio"]})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
