"""``srigl-compile table``: the paper's Table 1 in miniature, on digits and a teacher-student task."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click
import torch
import torch.nn as nn

from . import friendly_errors, main

# (label, method, ablation)
VARIANTS = (("static", "static", False), ("SET", "set", False), ("RigL", "rigl", False),
            ("SRigL w/o ablation", "srigl", False), ("SRigL w/ ablation", "srigl", True))
SETTINGS = {  # data set -> (epochs, delta_t)
    "digits": (20, 20),
    "teacher": (10, 50),
}


def _model(data_name: str, data) -> nn.Module:
    from ..zoo import mlp

    if data_name == "teacher":  # the student has the teacher's shape
        return nn.Sequential(nn.Linear(data.input_shape[0], 128), nn.ReLU(), nn.Linear(128, data.num_classes))
    return mlp(data.input_shape, data.num_classes)


def _run(data_name, data, method, ablation, sparsity, seed):
    from ..config import SRigLConfig
    from ..recipes import train_classifier

    epochs, delta_t = SETTINGS[data_name]
    torch.manual_seed(seed)
    config = None if method == "dense" else SRigLConfig(
        sparsity=sparsity, method=method, ablation=ablation, seed=seed, delta_t=delta_t, too_small="dense")
    result = train_classifier(_model(data_name, data), data, config, epochs=epochs, seed=seed)
    stats = result.updater.stats() if result.updater else None
    no_inputs = None
    if stats:
        layers = stats["layers"].values()
        no_inputs = sum(s["ablated_neurons"] for s in layers) / sum(s["active_neurons"] + s["ablated_neurons"]
                                                                  for s in layers)
    return {"accuracy": result.accuracy, "density": _weight_density(result.model), "no_input_fraction": no_inputs}


def _weight_density(model: nn.Module) -> float:
    """Non-zeros over all Linear/Conv weights, dense layers included (as they count for the model's size)."""
    nnz = total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            mask = getattr(module, "mask", None)
            nnz += int(mask.sum()) if mask is not None else module.weight.numel()
            total += module.weight.numel()
    return nnz / total


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def _markdown(data_name: str, rows: list[dict], sparsities: list[float], seeds: int) -> str:
    epochs, delta_t = SETTINGS[data_name]
    lines = [f"### {data_name} (MLP, {epochs} epochs, delta_t={delta_t}, {seeds} seeds: mean ± std of test accuracy %)",
             "", "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    lines.append("| dense | " + " | ".join(_cell(dense) for _ in sparsities) + " |")
    for label, _, _ in VARIANTS:
        cells = [_cell([r["accuracy"] for r in rows if r["label"] == label and r["sparsity"] == s])
                 for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rigl = [statistics.mean(r["no_input_fraction"] for r in rows if r["label"] == "RigL" and r["sparsity"] == s)
            for s in sparsities]
    lines.append("| RigL: neurons with no inputs | " + " | ".join(f"{100 * v:.1f}%" for v in rigl) + " |")
    # Over all weight layers: layers too small for k >= 1 stay dense (too_small="dense"), ERK may make small layers
    # dense, and k = floor(budget / n_out) rounds down, so the achieved density can differ from the target.
    density = [statistics.mean(r["density"] for r in rows if r["label"] == "SRigL w/ ablation" and r["sparsity"] == s)
               for s in sparsities]
    lines.append("| achieved weight density (SRigL) | " + " | ".join(f"{100 * v:.1f}%" for v in density)
                 + " |")
    return "\n".join(lines) + "\n"


@main.command()
@click.option("--data", "datasets", default="digits,teacher", show_default=True, help="comma-separated")
@click.option("--sparsities", default="0.8,0.9,0.95,0.99", show_default=True)
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="reports/table", show_default=True)
@friendly_errors
def table(datasets, sparsities, seeds, out):
    """Accuracy of dense / static / SET / RigL / SRigL without and with ablation across sparsities and seeds,
    plus the fraction of neurons RigL leaves with no inputs. Writes OUT/table.md and OUT/table.json.

    Example: srigl-compile table --data digits --sparsities 0.9,0.99 --seeds 2
    """
    from tqdm.auto import tqdm

    from ..config import SRigLConfig
    from ..data import load_dataset

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    if not names or set(names) - set(SETTINGS):
        raise click.BadParameter(f"choose from {sorted(SETTINGS)}", param_hint="--data")
    try:
        levels = [SRigLConfig(sparsity=float(s)).sparsity for s in sparsities.split(",")]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--sparsities") from None
    jobs = [(d, "dense", "dense", False, None, seed) for d in names for seed in range(seeds)]
    jobs += [(d, label, method, ablation, s, seed) for d in names for s in levels
             for label, method, ablation in VARIANTS for seed in range(seeds)]
    rows, cache = [], {}
    for data_name, label, method, ablation, sparsity, seed in tqdm(jobs, desc="training", disable=None):
        if (data_name, seed) not in cache:
            cache[(data_name, seed)] = load_dataset(data_name, seed=seed)
        result = _run(data_name, cache[(data_name, seed)], method, ablation, sparsity or 0.5, seed)
        rows.append({"data": data_name, "label": label, "method": method, "sparsity": sparsity, "seed": seed,
                     **result})
    text = "\n".join(_markdown(d, [r for r in rows if r["data"] == d], levels, seeds) for d in names)
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "table.json").write_text(json.dumps(rows, indent=1))
    Path(out, "table.md").write_text(text)
    click.echo(text)
