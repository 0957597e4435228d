"""``srigl-compile demo``: the whole mission on digits in a few minutes, with a report folder."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click
import torch

from . import friendly_errors, main
from .options import NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE_INT

DEMO_METHODS = ("dense", "static", "rigl", "srigl")


def _train_all(models, sparsity, epochs, seed):
    from ..recipes import train_digits

    runs = {}
    for model in models:
        for method in DEMO_METHODS:
            click.echo(f"training {model} {method} ...", nl=False)
            start = time.perf_counter()
            result = train_digits(method, sparsity, model=model, epochs=epochs, seed=seed, progress=True)
            runs[(model, method)] = result
            click.echo(f" accuracy {result.accuracy:.4f} ({time.perf_counter() - start:.1f} s)")
    return runs


def _lower_and_time(runs, models, seed):
    from ..data import load_digits
    from ..passes.lower import lower
    from .timing import median_us

    data = load_digits(seed)
    rows = []
    for model in models:
        sparse, dense = runs[(model, "srigl")].model.eval(), runs[(model, "dense")].model.eval()
        lowered = lower(sparse, target="llvm", progress=False)
        with torch.no_grad():
            error = float((lowered(data.x_test) - sparse(data.x_test)).abs().max())
            same_predictions = bool(torch.equal(lowered(data.x_test).argmax(1), sparse(data.x_test).argmax(1)))
        if error > 1e-3:
            raise click.ClickException(f"lowered {model} differs from the trained model by {error:.2e}")
        for batch in (1, 256):
            x = data.x_test[:batch] if batch <= len(data.x_test) else torch.randn(batch, *data.input_shape)
            with torch.no_grad():
                row = {"model": model, "batch": batch, "dense_us": median_us(lambda: dense(x)),
                       "srigl_masked_us": median_us(lambda: sparse(x)), "lowered_us": median_us(lambda: lowered(x)),
                       "max_abs_error": error, "same_predictions": same_predictions}
            rows.append(row)
            click.echo(f"{model} batch {batch}: dense {row['dense_us']:.1f} us, lowered SRigL {row['lowered_us']:.1f}"
                       f" us ({row['dense_us'] / row['lowered_us']:.2f}x); max |lowered - trained| {error:.1e}")
    return rows


@main.command()
@click.option("--sparsity", type=OPEN_FRACTION, default=0.9, show_default=True)
@click.option("--epochs", type=POSITIVE_INT, default=20, show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--models", default="mlp,cnn", show_default=True, help="comma-separated: mlp, cnn")
@click.option("--out", type=click.Path(file_okay=False), default="reports/demo", show_default=True)
@friendly_errors
def demo(sparsity, epochs, seed, models, out):
    """Train an MLP and a CNN on sklearn's digits dense, static, RigL and SRigL; lower SRigL; compare latency.

    Writes OUT/results.json, OUT/summary.md and PNG plots (accuracy, loss curves, per-layer neurons and fan-in
    over training, latency). Deterministic for a given --seed.

    Example: srigl-compile demo --sparsity 0.9 --epochs 20 --out reports/demo
    """
    from ..config import SRigLConfig
    from .report import write_report

    SRigLConfig(sparsity=sparsity)  # validate before minutes of training
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(model_list) - {"mlp", "cnn"})
    if unknown or not model_list:
        raise click.BadParameter(f"unknown model(s) {unknown}; use mlp and/or cnn", param_hint="--models")
    runs = _train_all(model_list, sparsity, epochs, seed)
    latency = _lower_and_time(runs, model_list, seed)
    results = {
        "args": {"sparsity": sparsity, "epochs": epochs, "seed": seed, "models": model_list},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "accuracy": {f"{m}/{meth}": r.accuracy for (m, meth), r in runs.items()},
        "losses": {f"{m}/{meth}": r.losses for (m, meth), r in runs.items()},
        "history": {m: runs[(m, "srigl")].history for m in model_list},
        "final_stats": {f"{m}/{meth}": r.updater.stats() for (m, meth), r in runs.items() if r.updater},
        "latency": latency,
    }
    path = write_report(Path(out), results)
    click.echo(f"report: {path}")
