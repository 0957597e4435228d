"""The suite's report: markdown tables and matplotlib plots from the JSON results of ``run.py``.

    python benchmarks/report.py [benchmarks/results] [--publish]

Reads layers.json, models.json, training.json and decoder.json (whichever exist) from the folder, writes report.md
and the PNGs next to them. ``--publish`` also copies the PNGs to benchmarks/img/ and puts report.md between the
``<!-- generated -->`` markers of benchmarks/RESULTS.md (the prose around them is kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
PUBLISH_MD, PUBLISH_IMG = HERE / "RESULTS.md", HERE / "img"
BEGIN, END = "<!-- generated: begin (python benchmarks/run.py --publish) -->", "<!-- generated: end -->"

CPU_VARIANTS = ("dense", "dense_compile", "csr", "structured", "gather", "tvm_dense", "lowered_llvm")
HEADERS = {"dense": "dense", "dense_compile": "compile", "csr": "CSR", "structured": "structured",
           "gather": "gather", "tvm_dense": "TVM dense", "lowered_llvm": "lowered", "bound": "bound",
           "dense_cuda": "dense (cuda)", "lowered_cuda": "lowered (cuda)"}
STYLE = {"dense_compile": "C0", "csr": "C1", "structured": "C2", "gather": "C4", "tvm_dense": "C5",
         "lowered_llvm": "C3"}


def load(folder: Path) -> dict[str, dict]:
    return {part: json.loads((folder / f"{part}.json").read_text())
            for part in ("layers", "models", "training", "decoder") if (folder / f"{part}.json").exists()}


def fmt_us(us: float) -> str:
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def cell(row: dict | None) -> str:
    if row is None or "skipped" in row:
        return "-"
    if "time_us" not in row:
        return "FAIL"
    return fmt_us(row["time_us"]["median"])


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict[str, dict]]:
    """{(key values): {variant: row}}, in first-seen order."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[r["variant"]] = r
    return out


def environment_line(env: dict) -> str:
    target = env.get("llvm_target")
    mcpu = target.get("mcpu") if isinstance(target, dict) else target
    threads = env.get("threads", env.get("torch_threads"))  # (older results name it torch_threads)
    return (f"{env['cpu']} ({env['cores']} cores, llvm mcpu `{mcpu}`), torch {env['torch']} with "
            f"{threads} threads, TVM {env.get('tvm')} with TVM_NUM_THREADS={env.get('tvm_threads')}, "
            f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}, GPU: {env.get('gpu') or 'none'}; commit "
            f"{env.get('git_commit')}; 1-minute load average {env.get('load_average')} when the part finished.")


def layer_tables(rows: list[dict], gpu: bool, h: str) -> list[str]:
    variants = CPU_VARIANTS + (("dense_cuda", "lowered_cuda") if gpu else ())
    lines = []
    for layer, cases in group_by_layer(rows).items():
        lines += [f"{h}# {layer}", "",
                  "| mask | sparsity | batch | k | active | " + " | ".join(HEADERS[v] for v in variants)
                  + " | bound | lowered vs dense | vs best other | spread |",
                  "|" + "---|" * (len(variants) + 9)]
        for (mask, sparsity, batch), by_variant in cases.items():
            any_row = next(iter(by_variant.values()))
            lines.append(f"| {mask} | {sparsity:.0%} | {batch} | {any_row['k']} | {any_row['active']} | "
                         + " | ".join(cell(by_variant.get(v)) for v in variants)
                         + f" | {cell(by_variant.get('bound'))} | {ratio_cells(by_variant)} |")
        lines.append("")
    return lines


def group_by_layer(rows: list[dict]) -> dict[str, dict[tuple, dict[str, dict]]]:
    layers: dict[str, list[dict]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r)
    return {name: group(layer_rows, ("mask", "sparsity", "batch")) for name, layer_rows in layers.items()}


def ratio_cells(by_variant: dict[str, dict]) -> str:
    timed = {v: r["time_us"]["median"] for v, r in by_variant.items() if "time_us" in r and v in CPU_VARIANTS}
    spreads = [(r["time_us"]["p75"] - r["time_us"]["p25"]) / r["time_us"]["median"]
               for v, r in by_variant.items() if "time_us" in r and v in CPU_VARIANTS]
    lowered = timed.get("lowered_llvm")
    others = [t for v, t in timed.items() if v != "lowered_llvm"]
    if lowered is None or "dense" not in timed:
        return "- | - | -"
    return (f"{timed['dense'] / lowered:.2f}x | {min(others) / lowered:.2f}x | "
            f"{max(spreads, default=0):.0%}")


def checks_summary(rows: list[dict]) -> list[str]:
    checked = [r for r in rows if "check" in r]
    failed = [r for r in checked if not r["check"]["passed"]]
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if "skipped" in r:
            skipped.setdefault(r["variant"], []).append(r["skipped"])
    worst = max((r["check"].get("max_abs_err", 0.0) for r in checked if r["check"]["passed"]), default=0.0)
    lines = [f"Checks: {len(checked) - len(failed)} of {len(checked)} variant runs matched the dense reference "
             f"(largest max-abs error {worst:.1e}) before they were timed."]
    lines += [f"- FAILED: {r['layer']} {r['mask']} {r['sparsity']:.0%} B={r['batch']} {r['variant']}: "
              f"{r['check']}" for r in failed]
    for variant, reasons in skipped.items():
        distinct = list(dict.fromkeys(reasons))
        more = f" (+{len(distinct) - 2} more)" if len(distinct) > 2 else ""
        lines.append(f"- skipped {variant} ({len(reasons)} runs): {'; '.join(distinct[:2])}{more}")
    return lines + [""]


def model_table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch | input | dense ms | dense, BN folded ms | masked ms | lowered ms | lowered vs dense | "
             "vs dense, BN folded | best dense ms (model @ threads) | lowered vs best dense | lowered, cpu_graph ms | "
             "it vs best dense | sparse layers' share before (dense) | after (lowered) | lowered vs masked (rel. "
             "err) |", "|" + "---|" * 16]
    for (model, batch, res), v in group(rows, ("model", "batch", "resolution")).items():
        ms = {name: (f"{r['time_us']['median'] / 1e3:.1f}" if "time_us" in r else "FAIL") for name, r in v.items()}
        low = v.get("lowered", {})
        share = lambda r: f"{r['sparse_share']['share']:.0%}" if r and "sparse_share" in r else "-"  # noqa: E731
        ratio = lambda key: f"{low[key]:.2f}x" if key in low else "-"  # noqa: E731
        err = low.get("check", {}).get("max_rel_err_vs_masked", float("nan"))
        best = low.get("best_dense")
        best_cell = f"{best['median_us'] / 1e3:.1f} ({best['variant']} @ {best['setting']})" if best else "-"
        graph = v.get("lowered_graph", {})
        graph_ratio = f"{graph['speedup_vs_best_dense']:.2f}x" if "speedup_vs_best_dense" in graph else "-"
        lines.append(f"| {model} | {batch} | {res}x{res} | {ms.get('dense')} | {ms.get('dense_folded', '-')} | "
                     f"{ms.get('masked')} | {ms.get('lowered')} | {ratio('speedup_vs_dense')} | "
                     f"{ratio('speedup_vs_dense_folded')} | {best_cell} | {ratio('speedup_vs_best_dense')} | "
                     f"{ms.get('lowered_graph', '-')} | {graph_ratio} | {share(v.get('dense'))} | {share(low)} | "
                     f"{err:.1e} |")
    return lines + [""]


def efficiency_table(rows: list[dict]) -> list[str]:
    """Per model and batch, the lowered layers' share of a forward and their achieved GFLOP/s against the
    machine's sgemm peak (``layer_efficiency.py``), with the three slowest layers; empty without the figures."""
    timed = [r for r in rows if r["variant"] == "lowered" and "kernel_efficiency" in r]
    if not timed:
        return []
    peaks = sorted({f"{r['kernel_efficiency']['sgemm_peak_gflops']:.0f}" for r in timed})
    lines = [f"Kernel efficiency (`benchmarks/layer_efficiency.py`): each lowered layer's calls timed inside the "
             f"forward (hooks; its padding and crop included; one call per batch chunk, summed), useful GFLOP = "
             f"2 x active neurons x k x output positions, against torch's sgemm peak at the same threads "
             f"({' / '.join(peaks)} GFLOP/s).", "",
             "| model | batch | forward ms | in lowered layers ms | useful GFLOP | GFLOP/s | of peak | slowest layers "
             "(ms, of peak) |", "|" + "---|" * 8]
    for r in timed:
        e = r["kernel_efficiency"]
        slowest = sorted(e["layers"], key=lambda layer: -layer["ms"])[:3]
        names = ", ".join(f"{layer['layer']} {layer['ms']:.2f} ({layer['of_peak']:.0%})" for layer in slowest)
        lines.append(f"| {r['model']} | {r['batch']} | {e['forward_ms']:.1f} | {e['layers_ms']:.1f} | "
                     f"{e['useful_gflop']:.2f} | {e['gflops']:.0f} | {e['gflops'] / e['sgemm_peak_gflops']:.0%} | "
                     f"{names} |")
    return lines + [""]


PEER_PREFIXES = ("onnxruntime", "openvino")


def peer_table(rows: list[dict]) -> list[str]:
    """ONNX Runtime and OpenVINO beside torch (``run.py --peers``): ms on the dense / the masked model, the
    lowered model's ratio to the fastest dense f32 runtime, the peers' errors against torch; empty without them."""
    peers = [r for r in rows if r["variant"].startswith(PEER_PREFIXES)]
    if not peers:
        return []
    timed = [r for r in peers if "peer" in r]
    versions = {f"{r['peer']['runtime']} {r['peer']['version']}" for r in timed}
    threads = sorted({r["peer"]["threads"] for r in timed})
    intro = ("Peers (`--peers`, `benchmarks/peers.py`): " + (", ".join(sorted(versions)) or "none installed")
             + (f", each with {'/'.join(map(str, threads))} threads, in its own process" if threads else "")
             + "; dense / masked = the dense model / the masked model's weights (zeros kept) in a plain dense copy. "
             "Errors: largest |peer - torch| over torch's largest output.")
    header = ("| model | batch | torch dense ms (best setting) | lowered ms | ONNX Runtime dense / masked ms | "
              "OpenVINO f32 dense / masked ms | OpenVINO default dense / masked ms (precision) | fastest dense f32 "
              "runtime ms | lowered vs it | lowered, cpu_graph ms | it vs the fastest f32 | rel. err f32 / default | "
              "lowered, bf16 values ms (rel. err) | it vs the fastest dense runtime in reduced precision |")
    lines = [intro, "", header, "|" + "---|" * 14]

    def ms(row: dict | None) -> str:
        return f"{row['time_us']['median'] / 1e3:.1f}" if row and "time_us" in row else "-"

    def pair(v: dict[str, dict], name: str) -> str:
        return f"{ms(v.get(name + '_dense'))} / {ms(v.get(name + '_masked'))}"

    for (model, batch), v in group(rows, ("model", "batch")).items():
        if not any(name.startswith(PEER_PREFIXES) for name in v):
            continue
        low = v.get("lowered", {})
        best = low.get("best_dense")
        best_cell = f"{best['median_us'] / 1e3:.1f} ({best['variant']} @ {best['setting']})" if best else "-"
        fastest = low.get("fastest_dense_f32")
        fastest_cell = f"{fastest['median_us'] / 1e3:.1f} ({fastest['variant']})" if fastest else "-"
        ratio = f"{low['speedup_vs_fastest_dense_f32']:.2f}x" if "speedup_vs_fastest_dense_f32" in low else "-"
        graph = v.get("lowered_graph", {})
        graph_ratio = (f"{graph['speedup_vs_fastest_dense_f32']:.2f}x" if "speedup_vs_fastest_dense_f32" in graph
                       else "-")
        default = v.get("openvino_default_dense", {}).get("peer", {}).get("precision", "-")
        errors = {kind: max((r["check"]["max_rel_err"] for n, r in v.items() if n.startswith(PEER_PREFIXES)
                             and "check" in r and (r["peer"]["precision"] == "f32") == (kind == "f32")),
                            default=None) for kind in ("f32", "default")}
        err = " / ".join(f"{e:.1e}" if e is not None else "-" for e in errors.values())
        bf16 = v.get("lowered_bf16", {})
        bf16_err = f" ({bf16['check']['max_rel_err_vs_masked']:.1e})" if "check" in bf16 else ""
        bf16_ratio = (f"{bf16['speedup_vs_fastest_dense_reduced']:.2f}x ({bf16['fastest_dense_reduced']['variant']})"
                      if "speedup_vs_fastest_dense_reduced" in bf16 else "-")
        lines.append(f"| {model} | {batch} | {best_cell} | {ms(low)} | {pair(v, 'onnxruntime')} | "
                     f"{pair(v, 'openvino_f32')} | {pair(v, 'openvino_default')} ({default}) | {fastest_cell} | {ratio} | "
                     f"{ms(graph or None)} | {graph_ratio} | {err} | {ms(bf16)}{bf16_err} | {bf16_ratio} |")
    notes = dict.fromkeys(f"{r['variant']}: {r['skipped']}" for r in peers if "skipped" in r)
    failed = [f"{r['model']} B={r['batch']} {r['variant']}: {r['check']}" for r in peers
              if "check" in r and not r["check"]["passed"]]
    return lines + [""] + [f"- skipped {note}" for note in notes] + [f"- FAILED {f}" for f in failed] + [""]


def decoder_table(rows: list[dict]) -> list[str]:
    lines = ["| model | variant | batch | prompt + new tokens | generate() ms | tokens/s | vs dense | lowered tokens "
             "== pruned |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in row else "-"
        check = ("yes" if row["check"]["passed"] else "NO") if "check" in row else "-"
        lines.append(f"| {row['model']} | {row['variant']} | {row['batch']} | {row['prompt']} + {row['new_tokens']} | "
                     f"{row['time_us']['median'] / 1e3:.0f} | {row['tokens_per_s']:.1f} | {ratio} | {check} |")
    return lines + [""]


PAPER_DELTA_T = 100  # the reference's mask-update interval: what the amortised cost is quoted at


def training_table(rows: list[dict]) -> list[str]:
    """The timed runs update every few steps to measure updates; the amortised cost is quoted at delta_t = 100."""
    lines = ["| model | dense step ms | SRigL step ms | SRigL / dense | one mask update ms | = dense steps | "
             f"+ per step at delta_t = {PAPER_DELTA_T} |", "|---|---|---|---|---|---|---|"]
    for (model,), v in group(rows, ("model",)).items():
        dense, srigl = v["dense"], v["srigl"]
        update = srigl.get("update_extra") or {}
        steps = srigl.get("update_in_dense_steps")
        amortised = f"+{steps / PAPER_DELTA_T:.1%}" if steps else "-"
        lines.append(f"| {model} | {dense['step']['median'] * 1e3:.1f} | {srigl['step']['median'] * 1e3:.1f} | "
                     f"{srigl['step_ratio']:.2f}x | {update.get('median', float('nan')) * 1e3:.0f} | "
                     f"{steps if steps is None else round(steps, 1)} | {amortised} |")
    return lines + [""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and ssh sessions
    import matplotlib.pyplot as plt

    return plt


def _speedups(cases: dict[tuple, dict[str, dict]], mask: str, sparsity: float, variant: str):
    """(batch, dense time / variant time) where both were timed."""
    points = []
    for (m, s, batch), v in cases.items():
        if m == mask and s == sparsity and "time_us" in v.get(variant, {}) and "time_us" in v.get("dense", {}):
            points.append((batch, v["dense"]["time_us"]["median"] / v[variant]["time_us"]["median"]))
    return points


def plot_batch(layer: str, cases: dict, out: Path) -> str:
    """Speed-up over dense eager against batch, one panel per sparsity, one line per variant (plus the bound)."""
    plt = _pyplot()
    masks = {m for m, _, _ in cases}
    mask = "trained" if "trained" in masks else sorted(masks)[0]
    sparsities = sorted({s for _, s, _ in cases})
    cols = min(len(sparsities), 2)
    rows = -(-len(sparsities) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5 * cols, 7), 3.2 * rows + 0.6), squeeze=False)
    for ax, sparsity in zip(axes.flat, sparsities):
        for variant in (*STYLE, "bound"):
            points = _speedups(cases, mask, sparsity, variant)
            _line(ax, points, variant)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set(xscale="log", yscale="log", title=f"{sparsity:.0%} sparse", xlabel="batch",
               ylabel="speed-up over torch dense")
    for ax in list(axes.flat)[len(sparsities):]:
        ax.axis("off")
    fig.suptitle(f"{layer} ({mask} masks); dashed: bandwidth bound", fontsize=10)
    return _save(plt, fig, out / f"speedup_vs_batch_{layer}.png")


def plot_sparsity(layers: dict[str, dict], out: Path, batch: int = 1) -> str:
    """Speed-up over dense eager against sparsity at batch 1, one panel per layer, with the bandwidth bound."""
    plt = _pyplot()
    cols = min(len(layers), 3)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 7), 3.1 * rows + 0.6), squeeze=False)
    for ax, (layer, cases) in zip(axes.flat, layers.items()):
        masks = {m for m, _, _ in cases}
        mask = "trained" if "trained" in masks else sorted(masks)[0]
        for variant in (*STYLE, "bound"):
            points = []
            for (m, sparsity, b), v in cases.items():
                if m == mask and b == batch and "time_us" in v.get(variant, {}) and "time_us" in v.get("dense", {}):
                    points.append((sparsity * 100, v["dense"]["time_us"]["median"] / v[variant]["time_us"]["median"]))
            _line(ax, points, variant)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set(yscale="log", title=f"{layer} ({mask})", xlabel="sparsity %", ylabel="speed-up over torch dense")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"batch {batch}; dashed: bandwidth bound", fontsize=10)
    return _save(plt, fig, out / f"speedup_vs_sparsity_b{batch}.png")


def _line(ax, points: list[tuple[float, float]], variant: str) -> None:
    if not points:
        return
    xs, ys = zip(*sorted(points))
    style = {"color": "k", "linestyle": "--", "marker": "_"} if variant == "bound" else \
        {"color": STYLE[variant], "marker": "o"}
    ax.plot(xs, ys, label=HEADERS[variant], linewidth=1.2, markersize=4, **style)


def _save(plt, fig, path: Path) -> str:
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)  # ~50-100 KB each: small enough to commit
    plt.close(fig)
    return path.name


def provenance(part: dict) -> str:
    env = part["environment"]
    return f"Command: `{env['command']}` (finished {env['date']}, took {part.get('seconds', 0) / 60:.1f} min)."


def render(results: dict[str, dict], out: Path, image_prefix: str = "", level: int = 2) -> str:
    """The report's markdown, its sections at heading ``level``; writes the plots into ``out``. Each section
    names the command that produced it (parts may come from different runs into the same folder)."""
    h = "#" * level
    env = next(iter(results.values()))["environment"]
    quick = any(part.get("args", {}).get("quick") for part in results.values())
    lines = [f"{h} Environment", "", environment_line(env), ""]
    if quick:
        lines += ["**Quick mode: correctness smoke test only. The timings below are too short to mean anything.**",
                  ""]
    if "layers" in results:
        rows = results["layers"]["rows"]
        layers = group_by_layer(rows)
        gpu = any(r["device"] == "cuda" and "time_us" in r for r in rows)
        plots = [plot_sparsity(layers, out)] + [plot_batch(layer, cases, out) for layer, cases in layers.items()]
        lines += [f"{h} Layers", "", provenance(results["layers"]), "",
                  "Median us per call (IQR in layers.json); `-` = skipped (reasons below). \"vs best other\" = the "
                  "fastest other CPU variant over lowered; \"spread\" = the largest IQR/median in the row.", ""]
        lines += layer_tables(rows, gpu, h) + checks_summary(rows)
        lines += [f"![{name}]({image_prefix}{name})" for name in plots] + [""]
    if "models" in results:
        lines += [f"{h} Models (90% sparse)", "", provenance(results["models"]), ""]
        lines += model_table(results["models"]["rows"]) + efficiency_table(results["models"]["rows"])
        lines += peer_table(results["models"]["rows"])
    if "training" in results:
        lines += [f"{h} Training", "", provenance(results["training"]), ""]
        lines += training_table(results["training"]["rows"])
    if "decoder" in results:
        lines += [f"{h} Decoder pruned by Wanda (90%), greedy generate()", "", provenance(results["decoder"]), ""]
        lines += decoder_table(results["decoder"]["rows"])
    return "\n".join(lines) + "\n"


def write_report(folder: Path) -> Path:
    folder = Path(folder)
    path = folder / "report.md"
    path.write_text("# Benchmark report\n\n" + render(load(folder), folder))
    return path


def publish(folder: Path) -> Path:
    """Copy the plots to benchmarks/img/ and replace RESULTS.md's generated section with this report."""
    folder = Path(folder)
    PUBLISH_IMG.mkdir(exist_ok=True)
    body = render(load(folder), folder, image_prefix="img/", level=3)
    for png in folder.glob("*.png"):
        shutil.copy(png, PUBLISH_IMG / png.name)
    text = PUBLISH_MD.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    PUBLISH_MD.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")
    return PUBLISH_MD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=HERE / "results")
    parser.add_argument("--publish", action="store_true", help="update benchmarks/RESULTS.md and benchmarks/img/")
    args = parser.parse_args()
    print(f"wrote {write_report(args.folder)}")
    if args.publish:
        print(f"updated {publish(args.folder)}")


if __name__ == "__main__":
    main()
