"""``srigl-compile table``: the paper's Table 1 in miniature, on digits, MNIST-5k and teacher-student tasks.

Each setting (a data set, a model, a schedule, its sparsities) is one table of test accuracy, mean ± std over seeds,
for dense, static, SET, RigL and SRigL without and with ablation, with the share of neurons left without inputs
(RigL) or ablated (SRigL), SRigL's constant fan-in k per layer and the weight density reached.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import click
import torch
import torch.nn as nn

from ..config import DENSE
from ..environment import environment
from .app import friendly_errors, main
from .options import NON_NEGATIVE

# (label, method, ablation)
VARIANTS = (("static", "static", False), ("SET", "set", False), ("RigL", "rigl", False),
            ("SRigL w/o ablation", "srigl", False), ("SRigL w/ ablation", "srigl", True))


@dataclasses.dataclass(frozen=True)
class Setting:
    """One table: what is trained (data, model), how long (epochs, delta_t) and at which sparsities."""

    data: str  # a load_dataset name, or "teacher"
    model: str  # "mlp" (zoo.mlp), "cnn" (zoo.small_cnn, 16 channels) or "student" (the teacher's shape)
    epochs: int
    delta_t: int
    sparsities: tuple[float, ...]
    title: str
    teacher_fan_in: int | None = None  # teacher-student only: inputs each teacher neuron reads
    gamma_sal: float | None = None  # the ablation threshold, when not the command's --gamma-sal

    def threshold(self, default: float) -> float:
        return self.gamma_sal if self.gamma_sal is not None else default


SETTINGS = {
    "digits": Setting("digits", "mlp", 20, 20, (0.8, 0.9, 0.95), "sklearn's 8x8 digits, MLP 64-256-256-10"),
    "mnist-mlp": Setting("mnist", "mlp", 15, 50, (0.8, 0.9, 0.95), "MNIST-5k, MLP 784-256-256-10"),
    "mnist-cnn": Setting("mnist", "cnn", 5, 20, (0.9, 0.95),
                         "MNIST-5k, small CNN (conv 3x3 16, conv 3x3 32, pool to 2x2, fc 128, fc 10)"),
    "teacher-representable": Setting("teacher", "student", 10, 50, (0.8, 0.9),
                                     "teacher-student, teacher fan-in 2 (representable)", teacher_fan_in=2),
    "teacher-unrepresentable": Setting("teacher", "student", 10, 50, (0.8, 0.9, 0.95),
                                       "teacher-student, teacher fan-in 8 (not representable)", teacher_fan_in=8),
    "mnist-high-sparsity": Setting("mnist", "mlp", 15, 50, (0.98, 0.99),
                                   "MNIST-5k, MLP 784-256-256-10 at high sparsity (ablation fires)"),
    "mnist-gamma-0.95": Setting("mnist", "mlp", 15, 50, (0.9, 0.95),
                                "MNIST-5k, MLP 784-256-256-10, ablation threshold gamma_sal 0.95 (the demo's)",
                                gamma_sal=0.95),
}


def _load(setting: Setting, seed: int):
    from ..data import load_dataset, teacher_student

    if setting.data == "teacher":
        return teacher_student(seed=seed, fan_in=setting.teacher_fan_in)
    return load_dataset(setting.data, seed=seed)


def _model(setting: Setting, data) -> nn.Module:
    from ..zoo import mlp, small_cnn

    if setting.model == "student":  # the teacher's shape (data.teacher_student's defaults)
        return nn.Sequential(nn.Linear(data.input_shape[0], 128), nn.ReLU(), nn.Linear(128, data.num_classes))
    if setting.model == "cnn":
        return small_cnn(data.input_shape, data.num_classes, channels=16)
    return mlp(data.input_shape, data.num_classes)


def _run(setting: Setting, data, method, ablation, sparsity, seed, gamma_sal) -> dict:
    from ..config import training_config
    from ..recipes import train_classifier

    torch.manual_seed(seed)
    config = training_config(method, sparsity=sparsity, ablation=ablation, seed=seed, delta_t=setting.delta_t,
                             gamma_sal=gamma_sal, too_small="dense")
    start = time.perf_counter()
    result = train_classifier(_model(setting, data), data, config, epochs=setting.epochs, seed=seed)
    row = {"accuracy": result.accuracy, "density": _weight_density(result.model), "no_input_fraction": None,
           "k": None, "seconds": time.perf_counter() - start}
    if result.updater:
        layers = result.updater.stats()["layers"]
        row["no_input_fraction"] = (sum(s["ablated_neurons"] for s in layers.values())
                                    / sum(s["active_neurons"] + s["ablated_neurons"] for s in layers.values()))
        row["k"] = {name: s["k"] for name, s in layers.items()}
    return row


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


def _k_per_layer(rows: list[dict]) -> dict[str, int]:
    """SRigL w/o ablation's k per sparse layer (the same for every seed: k depends only on shapes and sparsity)."""
    ks = [r["k"] for r in rows if r["label"] == "SRigL w/o ablation"]
    return ks[0] if ks else {}


def _teacher_fan_in(setting: Setting, model: nn.Module) -> dict[str, int]:
    """Inputs each teacher neuron reads, per layer of the student (teacher_student caps it at the layer's width)."""
    return {name: min(setting.teacher_fan_in, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def _markdown(name: str, setting: Setting, rows: list[dict], sparsities: list[float], seeds: int,
              teacher_fan_in: dict[str, int], gamma_sal: float) -> str:
    lines = [f"### {name}: {setting.title}", "",
             f"{setting.epochs} epochs, delta_t={setting.delta_t}, gamma_sal={gamma_sal}, {seeds} seeds: mean ± std "
             "of test accuracy %.", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    at = {s: [r for r in rows if r["sparsity"] == s] for s in sparsities}
    dense = [r["accuracy"] for r in rows if r["method"] == DENSE]
    lines.append("| dense | " + " | ".join(_cell(dense) for _ in sparsities) + " |")
    for label, _, _ in VARIANTS:
        lines.append(f"| {label} | " + " | ".join(_cell([r["accuracy"] for r in at[s] if r["label"] == label])
                                                  for s in sparsities) + " |")

    def mean_of(label: str, key: str) -> list[float]:
        return [statistics.mean(r[key] for r in at[s] if r["label"] == label) for s in sparsities]

    lines.append("| RigL: neurons with no inputs | " + " | ".join(f"{100 * v:.1f}%"
                                                                  for v in mean_of("RigL", "no_input_fraction")) + " |")
    lines.append("| SRigL w/ ablation: neurons ablated | "
                 + " | ".join(f"{100 * v:.1f}%" for v in mean_of("SRigL w/ ablation", "no_input_fraction")) + " |")
    ks = [_k_per_layer(at[s]) for s in sparsities]
    lines.append("| SRigL k per sparse layer (w/o ablation) | "
                 + " | ".join(" / ".join(f"{layer}: {k}" for layer, k in k_s.items()) for k_s in ks) + " |")
    if teacher_fan_in:
        # A layer kept dense (not in k's dict) reads every input: it can represent any teacher layer.
        verdicts = ["yes" if all(k_s.get(layer, fan_in) >= fan_in for layer, fan_in in teacher_fan_in.items())
                    else "no" for k_s in ks]
        fan_ins = " / ".join(f"{layer}: {fan_in}" for layer, fan_in in teacher_fan_in.items())
        lines.append(f"| representable: teacher fan-in ({fan_ins}) <= student k in every layer? | "
                     + " | ".join(verdicts) + " |")
    # Over all weight layers: layers too small for k >= 1 stay dense (too_small="dense"), ERK may make small layers
    # dense, and k = floor(budget / n_out) rounds down, so the achieved density can differ from the target.
    lines.append("| achieved weight density (SRigL w/ ablation) | "
                 + " | ".join(f"{100 * v:.1f}%" for v in mean_of("SRigL w/ ablation", "density")) + " |")
    return "\n".join(lines) + "\n"


def _jobs(names: list[str], levels: dict[str, list[float]], seeds: int) -> list[tuple]:
    jobs = [(name, DENSE, DENSE, False, None, seed) for name in names for seed in range(seeds)]
    jobs += [(name, label, method, ablation, s, seed) for name in names for s in levels[name]
             for label, method, ablation in VARIANTS for seed in range(seeds)]
    return jobs


def _parse_sparsities(sparsities: str | None, names: list[str]) -> dict[str, list[float]]:
    from ..config import SRigLConfig

    if sparsities is None:
        return {name: list(SETTINGS[name].sparsities) for name in names}
    try:
        levels = [SRigLConfig(sparsity=float(s)).sparsity for s in sparsities.split(",")]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--sparsities") from None
    return {name: levels for name in names}


@main.command()
@click.option("--data", "datasets", default=",".join(SETTINGS), show_default=True,
              help=f"comma-separated settings: {', '.join(SETTINGS)}")
@click.option("--sparsities", default=None, help="comma-separated; default: each setting's own (see the tables)")
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--gamma-sal", type=NON_NEGATIVE, default=0.3, show_default=True,
              help="ablation threshold of the settings that do not set their own (mnist-gamma-0.95 does)")
@click.option("--out", type=click.Path(file_okay=False), default="reports/table", show_default=True)
@friendly_errors
def table(datasets, sparsities, seeds, gamma_sal, out):
    """Accuracy of dense / static / SET / RigL / SRigL without and with ablation across sparsities and seeds,
    plus the neurons RigL leaves without inputs and SRigL ablates. Writes OUT/table.md, OUT/table.json and
    OUT/environment.json (where and how it ran).

    Example: srigl-compile table --data digits,mnist-mlp --sparsities 0.9,0.99 --seeds 2
    """
    from tqdm.auto import tqdm

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    if not names or set(names) - set(SETTINGS):
        raise click.BadParameter(f"choose from {', '.join(SETTINGS)}", param_hint="--data")
    levels = _parse_sparsities(sparsities, names)
    rows, cache, started = [], {}, time.perf_counter()
    for name, label, method, ablation, sparsity, seed in tqdm(_jobs(names, levels, seeds), desc="training",
                                                              disable=None):
        if (name, seed) not in cache:
            cache[(name, seed)] = _load(SETTINGS[name], seed)
        threshold = SETTINGS[name].threshold(gamma_sal)
        result = _run(SETTINGS[name], cache[(name, seed)], method, ablation, sparsity or 0.5, seed, threshold)
        rows.append({"data": name, "label": label, "method": method, "sparsity": sparsity, "seed": seed,
                     "gamma_sal": threshold, **result})
    minutes = (time.perf_counter() - started) / 60
    parts = []
    for name in names:
        setting = SETTINGS[name]
        fan_in = _teacher_fan_in(setting, _model(setting, cache[(name, 0)])) if setting.teacher_fan_in else {}
        parts.append(_markdown(name, setting, [r for r in rows if r["data"] == name], levels[name], seeds, fan_in,
                               setting.threshold(gamma_sal)))
    text = "\n".join(parts) + f"\n({len(rows)} training runs, {minutes:.1f} minutes.)\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "table.json").write_text(json.dumps(rows, indent=1))
    Path(out, "environment.json").write_text(json.dumps({**environment(), "minutes": minutes}, indent=1))
    Path(out, "table.md").write_text(text)
    click.echo(text)
