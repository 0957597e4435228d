"""The demo's report folder: results.json, summary.md and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def _plots(out: Path, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, values = list(results["accuracy"]), list(results["accuracy"].values())
    ax.bar(labels, values, color=["#888" if "dense" in l else "#3a7" for l in labels])
    ax.set_ylim(min(values) - 0.05, 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {results['args']['sparsity']:.0%} sparse")
    ax.tick_params(axis="x", rotation=30)
    names.append(_save(fig, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, losses in results["losses"].items():
        window = 10
        smooth = [sum(losses[max(0, i - window):i + 1]) / len(losses[max(0, i - window):i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    names.append(_save(fig, out / "loss.png"))

    models = list(results["history"])
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 5), squeeze=False)
    for col, model in enumerate(models):
        history = results["history"][model]
        steps = [h["step"] for h in history]
        for layer in (history[0]["layers"] if history else {}):
            axes[0][col].plot(steps, [h["layers"][layer]["active_neurons"] for h in history], label=layer)
            axes[1][col].plot(steps, [h["layers"][layer]["k"] for h in history], label=layer)
        axes[0][col].set_title(f"{model}: active neurons per layer")
        axes[1][col].set_title(f"{model}: constant fan-in k per layer")
        axes[1][col].set_xlabel("step")
        if history:
            axes[0][col].legend(fontsize=7)
    names.append(_save(fig, out / "layers.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows = results["latency"]
    labels = [f"{r['model']} B={r['batch']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["dense_us"] for r in rows], width=0.4, label="dense (torch)")
    ax.bar([i + 0.2 for i in x], [r["lowered_us"] for r in rows], width=0.4, label="SRigL lowered (TVM)")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("median us per call")
    ax.legend()
    names.append(_save(fig, out / "latency.png"))
    return names


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _summary(results: dict, plots: list[str]) -> str:
    lines = [f"# srigl-compile demo: digits, {results['args']['sparsity']:.0%} sparsity", "",
             f"Seed {results['args']['seed']}, {results['args']['epochs']} epochs, torch {results['machine']['torch']},"
             f" {results['machine']['threads']} threads.", "", "| run | test accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in results["accuracy"].items()]
    lines += ["", "| model | batch | dense us | SRigL masked us | SRigL lowered us | speed-up | max abs error |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['dense_us']:.1f} | {r['srigl_masked_us']:.1f} | "
              f"{r['lowered_us']:.1f} | {r['dense_us'] / r['lowered_us']:.2f}x | {r['max_abs_error']:.1e} |"
              for r in results["latency"]]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = _plots(out, results)
    (out / "summary.md").write_text(_summary(results, plots))
    return out / "summary.md"
