"""The demo's report folder: results.json, summary.md and PNG plots (matplotlib, headless).

Each plot draws from a series function (``accuracy_series``, ``neuron_series``, ``latency_bars``) that tests can
check without reading pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..environment import machine_line

PLOTS = ("accuracy.png", "loss.png", "layers.png", "latency.png")


def accuracy_series(results: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Run -> (epochs, test accuracy after each epoch; epoch 0 is before training)."""
    return {run: ([int(e) for e, _ in curve], [a for _, a in curve])
            for run, curve in results["accuracy_curve"].items()}


def neuron_series(results: dict, model: str) -> dict[str, dict[str, list[int]]]:
    """Layer -> steps (0, then each mask update) and, at each, active neurons, neurons newly ablated and revived,
    and the constant fan-in k, for the SRigL run of ``model``."""
    history = results["neurons"][model]
    layers = history[0]["layers"] if history else {}
    keys = ("active", "ablated", "revived", "k")
    return {layer: {"steps": [h["step"] for h in history], **{key: [h["layers"][layer][key] for h in history]
                                                              for key in keys}}
            for layer in layers}


def latency_bars(results: dict) -> tuple[list[str], dict[str, list[float]], list[float]]:
    """Bar labels (model, batch), median microseconds per variant, and lowered's speed-up over dense."""
    rows = results["latency"]
    labels = [f"{r['model']} B={r['batch']}" for r in rows]
    times = {"dense (torch)": [r["dense_us"] for r in rows],
             "SRigL masked (torch)": [r["srigl_masked_us"] for r in rows],
             "SRigL lowered (TVM)": [r["lowered_us"] for r in rows]}
    return labels, times, [r["dense_us"] / r["lowered_us"] for r in rows]


def _plot_accuracy(plt, results: dict):
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lowest = 1.0
    for run, (epochs, accuracy) in accuracy_series(results).items():
        start = 1 if len(epochs) > 2 else 0  # from the first epoch on: the untrained ~10% would squash the curves
        ax.plot(epochs[start:], accuracy[start:], marker="o", markersize=3, label=f"{run} ({accuracy[-1]:.3f})",
                linestyle="--" if "dense" in run else "-")
        lowest = min(lowest, *accuracy[start:])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(max(0.0, lowest - 0.02), min(1.0, ax.get_ylim()[1] + 0.01))
    ax.set_title(f"{results['args']['data']}, {results['args']['sparsity']:.0%} sparse: accuracy over training")
    ax.legend(fontsize=7)
    return fig


def _plot_loss(plt, results: dict):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    window = 10
    for label, losses in results["losses"].items():
        smooth = [sum(losses[max(0, i - window):i + 1]) / len(losses[max(0, i - window):i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _plot_neurons(plt, results: dict):
    models = list(results["neurons"])
    fig, axes = plt.subplots(3, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        series = neuron_series(results, model)
        width = 0.8 * results["args"]["delta_t"] / max(1, len(series))
        for i, (layer, s) in enumerate(series.items()):
            color = f"C{i}"
            axes[0][col].plot(s["steps"], s["active"], marker=".", color=color, label=f"layer {layer}")
            offset = [step + (i - (len(series) - 1) / 2) * width for step in s["steps"]]
            axes[1][col].bar(offset, s["ablated"], width=width, color=color, label=f"layer {layer} ablated")
            axes[1][col].bar(offset, [-r for r in s["revived"]], width=width, color=color, hatch="//", alpha=0.5,
                             label=f"layer {layer} revived")
            axes[2][col].plot(s["steps"], s["k"], marker=".", color=color, label=f"layer {layer}")
        axes[0][col].set_title(f"{model} SRigL: active neurons per layer")
        axes[1][col].set_title("neurons ablated (up) / revived (down) at each mask update")
        axes[1][col].axhline(0, color="black", linewidth=0.5)
        axes[2][col].set_title("constant fan-in k per layer")
        axes[2][col].set_xlabel("step")
        for row in axes:
            if series:
                row[col].legend(fontsize=7)
    return fig


def _plot_latency(plt, results: dict):
    labels, times, speedups = latency_bars(results)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(times)
    for i, (variant, values) in enumerate(times.items()):
        ax.bar([x + (i - 1) * width for x in range(len(labels))], values, width=width, label=variant)
    for x, (value, speedup) in enumerate(zip(times["SRigL lowered (TVM)"], speedups)):
        ax.annotate(f"{speedup:.1f}x", (x + width, value), ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xticks(list(range(len(labels))), labels)
    ax.set_yscale("log")
    ax.set_ylabel("median us per call")
    ax.set_title("latency; bold: lowered SRigL's speed-up over dense")
    ax.legend(fontsize=7)
    return fig


def _plots(out: Path, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for name, draw in zip(PLOTS, (_plot_accuracy, _plot_loss, _plot_neurons, _plot_latency)):
        fig = draw(plt, results)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _summary(results: dict, plots: list[str]) -> str:
    args = results["args"]
    lines = [f"# srigl-compile demo: {args['data']}, {args['sparsity']:.0%} sparsity", ""]
    if results.get("note"):
        lines += [f"**Note:** {results['note']}", ""]
    lines += [f"Seed {args['seed']}, {args['epochs']} epochs, MLP hidden width {args['hidden']}, delta_t "
              f"{args['delta_t']}, gamma_sal {args['gamma_sal']}; {machine_line(results['machine'])}.", "",
              "## Targets", ""]
    lines += [f"- {'met' if t['met'] else '**not met**'}: {t['claim']}: {t['measured']}" for t in results["targets"]]
    lines += ["", "## Accuracy", "", "| run | test accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in results["accuracy"].items()]
    lines += ["", "## Neurons of the SRigL model at the end", "", "| model | layer | active | ablated | k |",
              "|---|---|---|---|---|"]
    for run, stats in results["final_stats"].items():
        if run.endswith("/srigl"):
            lines += [f"| {run.split('/')[0]} | {layer} | {s['active_neurons']} | {s['ablated_neurons']} | {s['k']} |"
                      for layer, s in stats["layers"].items()]
    rounds = {len(r["rounds_us"]["dense_us"]) for r in results["latency"] if "rounds_us" in r}
    how = (f"Median microseconds per call over {rounds.pop()} interleaved rounds of dense / masked / lowered / "
           "lowered under cpu_graph (each round a blocked_autorange median; every round is in results.json)."
           if len(rounds) == 1 else "")
    lines += ["", "## Latency", "", how, "",
              "| model | batch | dense us | SRigL masked us | SRigL lowered us | speed-up | lowered, cpu_graph us | "
              "speed-up | max abs error |", "|---|---|---|---|---|---|---|---|---|"]

    def graphed(r: dict) -> str:  # (results written before cpu_graph have no such column)
        graph_us = r.get("lowered_graph_us")
        return f"{graph_us:.1f} | {r['dense_us'] / graph_us:.2f}x" if graph_us else "- | -"

    lines += [f"| {r['model']} | {r['batch']} | {r['dense_us']:.1f} | {r['srigl_masked_us']:.1f} | "
              f"{r['lowered_us']:.1f} | {r['dense_us'] / r['lowered_us']:.2f}x | {graphed(r)} | "
              f"{r['max_abs_error']:.1e} |" for r in results["latency"]]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = _plots(out, results)
    (out / "summary.md").write_text(_summary(results, plots))
    return out / "summary.md"
