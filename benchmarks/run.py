"""The benchmark suite's one entry point: layers, models, training and a pruned decoder; JSON, a markdown report
and plots.

    python benchmarks/run.py                      # the full run (~25 min on 2 cores) -> benchmarks/results/
    python benchmarks/run.py --quick              # CI smoke test: tiny shapes, correctness checks, < 1 min
    python benchmarks/run.py --only layers --layers vit_fc2 --sparsities 0.9 --batches 1 256
    python benchmarks/run.py --publish            # ... and update benchmarks/RESULTS.md and benchmarks/img/
    python benchmarks/run.py --only models --peers  # ... with ONNX Runtime and OpenVINO (pip install -e '.[peers]')
    python benchmarks/run.py --only models --peers --bf16-values  # ... and the model lowered with bf16 values
    python benchmarks/run.py --only models --peers --dense-compiled  # ... and the dense model under torch.compile

Writes layers.json, models.json, training.json, decoder.json (rows with machine, versions, threads and this command), report.md
and PNG plots into --out. Exits with status 1 if any variant failed its correctness check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

# torch's OpenMP threads spin after each parallel region and steal the cores TVM's pool needs (a lowered layer
# ran 2-4x slower next to them); passive waiting lets both runtimes share the cores. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, TimerConfig, save_results, set_threads  # noqa: E402

PARTS = ("layers", "models", "training", "decoder")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one sparsity, checks; no timing claims")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for JSON, report.md and PNGs")
    parser.add_argument("--threads", type=int, default=2, help="torch and TVM threads (default 2)")
    parser.add_argument("--min-run-time", type=float, help="seconds of timing per variant (0.3; quick 0.01)")
    parser.add_argument("--layers", nargs="+", help="layer names (default: all of the mode's)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="default 0.8 0.9 0.95 0.99")
    parser.add_argument("--batches", type=int, nargs="+", help="override every layer's batches")
    parser.add_argument("--masks", nargs="+", choices=("uniform", "trained"), default=["uniform", "trained"])
    parser.add_argument("--models", nargs="+", help="model names (default: all of the mode's)")
    parser.add_argument("--model-inputs", nargs="+", metavar="BxRES",
                        help="batch x resolution pairs (default 1x224 64x224; 64x112 saves ~8 min)")
    parser.add_argument("--bf16-values", action="store_true",
                        help="models: also lower with bfloat16 condensed values and time it (lowered_bf16)")
    parser.add_argument("--peers", action="store_true",
                        help="models: also time ONNX Runtime and OpenVINO (the [peers] extra) on the dense and masked "
                             "models")
    parser.add_argument("--dense-compiled", action="store_true",
                        help="models: also time the dense model under torch.compile (inductor, freezing) in each "
                             "dense child: dense_compiled@<setting>")
    parser.add_argument("--publish", action="store_true", help="update benchmarks/RESULTS.md and benchmarks/img/")
    args = parser.parse_args(argv)
    if os.environ["OMP_WAIT_POLICY"].upper() != "PASSIVE":
        parser.error("OMP_WAIT_POLICY must be PASSIVE (or unset): spinning OpenMP threads distort every TVM timing")
    return args


def pick(table: dict, names: list[str] | None, what: str) -> list:
    unknown = sorted(set(names or []) - set(table))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {sorted(table)}")
    return [table[n] for n in names] if names else list(table.values())


def run_part(part: str, args: argparse.Namespace, config: TimerConfig) -> list[dict]:
    if part == "layers":
        from layer_specs import LAYERS, QUICK_LAYERS, QUICK_SPARSITIES, SPARSITIES
        from layers import run_layers

        specs = pick(QUICK_LAYERS if args.quick else LAYERS, args.layers, "layers")
        sparsities = args.sparsities or (QUICK_SPARSITIES if args.quick else SPARSITIES)
        return run_layers(specs, sparsities, args.masks, config, args.batches)
    if part == "models":
        from models import MODELS, QUICK_MODELS, run_models

        inputs = [tuple(int(v) for v in pair.lower().split("x")) for pair in args.model_inputs or []]
        return run_models(pick(QUICK_MODELS if args.quick else MODELS, args.models, "models"), config, inputs,
                          peers=args.peers, bf16_values=args.bf16_values, dense_compiled=args.dense_compiled)
    if part == "decoder":
        from decoder import DECODERS, QUICK_DECODERS, run_decoders

        return run_decoders(list((QUICK_DECODERS if args.quick else DECODERS).values()), config)
    from bench_training import suite_rows

    return suite_rows(args.quick)


def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "check" in r and not r["check"]["passed"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.01 if args.quick else 0.3)
    config = TimerConfig(args.threads, min_run_time, 1 if args.quick else 3)
    failed = []
    for part in args.only:
        start = time.perf_counter()
        rows = run_part(part, args, config)
        extra = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "timer": dataclasses.asdict(config),
                 "seconds": time.perf_counter() - start}
        print(f"{part}: {len(rows)} rows in {extra['seconds']:.0f} s -> {save_results(part, rows, extra, args.out)}")
        failed += failures(rows)
    from report import publish, write_report

    print(f"report: {write_report(args.out)}")
    if args.publish:
        print(f"published: {publish(args.out)}")
    for row in failed:
        print(f"FAILED check: {row}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
