"""Train a small MLP on scikit-learn's bundled digits: dense, static, RigL, SET and SRigL at 90% sparsity.

    python examples/train_digits.py [--sparsity 0.9] [--epochs 30] [--seed 0] [--model mlp|cnn]

Prints test accuracy per method and SRigL's per-layer k / active neurons; every mask update checks the
invariants of every layer (it raises on violation), so a finished run is also a correctness check.
"""

from __future__ import annotations

import argparse
import json
import time

from srigl_compile.recipes import train_digits

METHODS = ("dense", "static", "set", "rigl", "srigl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    rows = []
    print(f"digits, {args.model}, {args.sparsity:.0%} sparse, {args.epochs} epochs, seed {args.seed}")
    print(f"{'method':<8} {'accuracy':>9} {'density':>8} {'explored':>9} {'seconds':>8}")
    for method in METHODS:
        start = time.perf_counter()
        result = train_digits(method, args.sparsity, model=args.model, epochs=args.epochs, seed=args.seed,
                              progress=True)
        seconds = time.perf_counter() - start
        stats = result.updater.stats() if result.updater else None
        density = stats["global"]["density"] if stats else 1.0
        explored = stats["global"]["explored_fraction"] if stats else 1.0
        print(f"{method:<8} {result.accuracy:>9.4f} {density:>8.4f} {explored:>9.4f} {seconds:>8.1f}")
        rows.append({"method": method, "accuracy": result.accuracy, "density": density, "explored": explored,
                     "seconds": seconds, "layers": stats["layers"] if stats else None})
    srigl = rows[-1]["layers"]
    print("SRigL layers: " + ", ".join(f"{n}: k={s['k']}/{s['fan_in']} active={s['active_neurons']}"
                                       for n, s in srigl.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
