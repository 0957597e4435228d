"""Interleaved A/B of two revisions on one lowered model: the way to measure a change on a noisy VM.

    python benchmarks/ab.py --base 4e2f987                         # base commit against the working tree
    python benchmarks/ab.py --base 07e2c8d --head 1f0fd29 --model resnet50 --batch 1 --rounds 3
    python benchmarks/ab.py --base 39b6f55 --model fc2 --calls 3000   # the paper's layer alone, 90% uniform
    python benchmarks/ab.py --base HEAD --graph head                 # eager against cpu_graph, same revision
    python benchmarks/ab.py --base 2bd9cde --compile both            # both sides under torch.compile (inductor)

Each revision is checked out in a temporary git worktree (the working tree itself when ``--head`` is not given).
Rounds alternate base, head, base, head, ...; each round is a fresh process that builds the model with that
revision's ``benchmarks/models.py`` (sparsify + ``lower``, as the model benchmark does), checks nothing, and
times ``--calls`` forwards after a warm-up; with ``--graph both`` (or ``head``) those sides time the lowered model
under ``srigl_compile.cpu_graph`` (revisions that have it), so kernel changes show without the Python between
kernels; with ``--compile both`` (or ``head``) those sides time ``torch.compile(lowered)`` (inductor, after its
first calls compiled it). ``--model fc2`` is the paper's layer alone (ViT-B's fc2, 3072->768, 90% sparse,
uniform), sparsified and lowered with the public API and timed through the lowered module. Separate benchmark
runs on this VM moved by 20-60% within minutes, so only figures taken side by side like this are quoted as the
effect of a change: the median over rounds of each round's median, and (for short calls, where a busy minute
swamps the medians) of each round's minimum. Prints both and writes
``ab_<model>_b<batch>_<base>_<head>.json`` (machine, versions, command, every round) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py: torch's spinning threads starve TVM's pool

ROOT = Path(__file__).resolve().parent.parent


def time_model(root: str, model: str, batch: int, resolution: int, calls: int, threads: int,
               graph: bool = False, compiled: bool = False) -> dict:
    """In a child process: the median forward time (ms) of ``model`` lowered by the code under ``root`` (under
    ``cpu_graph`` when ``graph``, ``torch.compile`` when ``compiled``)."""
    sys.path[:0] = [root, str(Path(root) / "benchmarks")]
    import time

    import torch

    import models as model_bench
    import srigl_compile
    from common import set_threads

    assert srigl_compile.__file__.startswith(root), f"imported {srigl_compile.__file__}, not the code under {root}"

    set_threads(threads)
    gen = torch.Generator().manual_seed(0)
    if model == "fc2":
        config = srigl_compile.SRigLConfig(sparsity=0.9, distribution="uniform", seed=0)
        layer = torch.nn.Sequential(torch.nn.Linear(3072, 768))  # (revisions before 2026-11 cannot lower a bare layer)
        lowered = srigl_compile.lower(srigl_compile.sparsify(layer, config))
        x = torch.randn(batch, 3072, generator=gen)
    else:
        lowered = model_bench.build(model_bench.MODELS[model], resolution)["lowered"]
        x = torch.randn(batch, 3, resolution, resolution, generator=gen)
    times = []
    with torch.no_grad():
        for _ in range(3):
            lowered(x)
        try:  # (revisions since batch chunks: the whole warm-up; since dense forms: their trials)
            from srigl_compile.nn.settle import settle
        except ImportError:
            try:
                from srigl_compile.nn.dense_fallback import settle
            except ImportError:
                settle = None
        if settle is not None:
            settle(lowered, x)
        if graph:
            lowered = srigl_compile.cpu_graph(lowered)
            for _ in range(3):  # (the first call records)
                lowered(x)
        if compiled:
            lowered = torch.compile(lowered)
            for _ in range(3):  # (the first call compiles)
                lowered(x)
        for _ in range(calls):
            start = time.perf_counter()
            lowered(x)
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def _worktree(rev: str, parent: Path) -> Path:
    path = parent / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision A")
    parser.add_argument("--head", help="git revision B (default: the working tree)")
    parser.add_argument("--model", default="resnet50", help="a benchmarks/models.py name, or fc2 (one layer)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--graph", choices=("none", "both", "head"), default="none",
                        help="time these sides under srigl_compile.cpu_graph")
    parser.add_argument("--compile", choices=("none", "both", "head"), default="none",
                        help="time these sides under torch.compile")
    parser.add_argument("--graphed", action="store_true", help=argparse.SUPPRESS)  # (a child's side)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # (a child's side)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.graph != "none" and args.compile != "none":
        parser.error("--graph and --compile time different things: choose one")
    if args.child:
        print(json.dumps(time_model(args.child, args.model, args.batch, args.resolution, args.calls, args.threads,
                                    args.graphed, args.compiled)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": _worktree(args.base, Path(tmp))}
        trees["head"] = _worktree(args.head, Path(tmp)) if args.head else ROOT
        runs = {"base": [], "head": []}
        try:
            for round_ in range(args.rounds):
                for side in ("base", "head"):
                    command = [sys.executable, __file__, "--base", args.base, "--child", str(trees[side]),
                               "--model", args.model, "--batch", str(args.batch), "--resolution",
                               str(args.resolution), "--calls", str(args.calls), "--threads", str(args.threads)]
                    if args.graph == "both" or (args.graph == "head" and side == "head"):
                        command.append("--graphed")
                    if args.compile == "both" or (args.compile == "head" and side == "head"):
                        command.append("--compiled")
                    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp)
                    runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
                    print(f"round {round_ + 1} {side}: {runs[side][-1]['median_ms']:.4g} ms", flush=True)
        finally:
            for side, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    head_name = args.head or "working tree"
    for stat in ("median_ms", "min_ms"):
        per_side = {side: statistics.median(r[stat] for r in rounds) for side, rounds in runs.items()}
        print(f"{args.model} B={args.batch}, {stat.removesuffix('_ms')} per round: {args.base} "
              f"{per_side['base']:.4g} ms, {head_name} {per_side['head']:.4g} ms "
              f"({per_side['base'] / per_side['head']:.2f}x)")
    medians = {side: statistics.median(r["median_ms"] for r in rounds) for side, rounds in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    graphed = "" if args.graph == "none" else f"_graph_{args.graph}"
    graphed += "" if args.compile == "none" else f"_compile_{args.compile}"
    path = args.out / f"ab_{args.model}_b{args.batch}_{args.base}_{args.head or 'worktree'}{graphed}.json"
    path.write_text(json.dumps({"environment": environment(), "command": sys.argv, "base": args.base,
                                "head": head_name, "graph": args.graph, "compile": args.compile, "median_ms": medians,
                                "rounds": runs},
                               indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
