"""The layer benchmark: every variant of every layer, sparsity, mask and batch; checked, then timed.

    python benchmarks/run.py --only layers [--layers vit_fc2 --sparsities 0.9 --batches 1 256]

One row per (layer, mask, sparsity, batch, variant): the check against the dense reference (the masked layer's
own forward), then the median and interquartile range of repeated runs in microseconds, or ``skipped`` with the
reason. A ``bound`` row per batch holds the bandwidth bound: the bytes the lowered kernel must move (values,
indices, the input and the output) over the read bandwidth of a buffer that size.
"""

from __future__ import annotations

import torch
from common import TimerConfig, measure, read_bandwidth
from layer_specs import LayerSpec
from masks import masked_layer
from tqdm import tqdm
from variants import VARIANTS, LayerCase, Skip, Variant

from srigl_compile.nn.settle import settle

RTOL, ATOL = 1e-4, 1e-4


def check(out: torch.Tensor, expected: torch.Tensor) -> dict:
    out = out.detach().cpu()
    err = float((out - expected).abs().max()) if out.shape == expected.shape else float("inf")
    passed = out.shape == expected.shape and torch.allclose(out, expected, rtol=RTOL, atol=ATOL)
    return {"passed": bool(passed), "max_abs_err": err}


def bound_us(case: LayerCase, batch: int, threads: int) -> tuple[float, int]:
    layer, spec = case.lowered[0], case.spec
    positions = spec.size**2 if spec.is_conv else 1
    moved = (layer.values.numel() * 4 + layer.indices.numel() * layer.indices.element_size()
             + batch * positions * (spec.n_in + spec.n_out) * 4)
    return moved / read_bandwidth(moved, threads) * 1e6, moved


def run_variant(variant: Variant, case: LayerCase, batch: int, x: torch.Tensor, reference: torch.Tensor,
                config: TimerConfig, timed: dict) -> dict:
    """One row: skipped, failed its check, or checked and timed (mask-independent variants timed once)."""
    fn = variant.build(case, batch)
    if isinstance(fn, Skip):
        return {"skipped": fn.reason}
    x = x.to(variant.device)
    expected = reference[:, case.active] if variant.active_only else reference
    try:
        result = check(fn(x), expected)
    except Exception as err:  # a broken variant is a row, not the end of a 30-minute run
        return {"check": {"passed": False, "error": f"{type(err).__name__}: {err}"}}
    if not result["passed"]:
        return {"check": result}
    key = (case.spec.name, variant.name, batch)
    if variant.mask_independent and key in timed:
        return {"check": result, "time_us": timed[key], "time_reused": True}
    if isinstance(fn, torch.nn.Module):  # (a lowered layer's trials at this shape end before it is timed)
        settle(fn, x)
    timed[key] = measure(lambda: fn(x), config)
    as_timed = check(fn(x), expected)  # (what was timed: the path its first calls chose, kernel or dense form)
    if not as_timed["passed"]:
        return {"check": {**as_timed, "as_timed": True}}
    return {"check": result, "time_us": timed[key]}


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_dense: dense eager over the variant, on the variant's device."""
    baseline = {r["device"]: r["time_us"]["median"] for r in rows if r["variant"] in ("dense", "dense_cuda")
                and "time_us" in r}
    for r in rows:
        if "time_us" in r and r["device"] in baseline:
            r["speedup_vs_dense"] = baseline[r["device"]] / r["time_us"]["median"]


def run_batch(case: LayerCase, batch: int, config: TimerConfig, timed: dict) -> list[dict]:
    base = {"layer": case.spec.name, "mask": case.mask_info["mask"], "sparsity": case.sparsity, "batch": batch,
            "k": case.mask_info["k"], "active": case.mask_info["active"], "n_out": case.spec.n_out,
            "threads": config.threads}
    x = case.spec.input(batch, torch.Generator().manual_seed(batch))
    bound, moved = bound_us(case, batch, config.threads)  # first: TVM's pool may still spin after a kernel
    rows = []
    with torch.no_grad():
        reference = case.layer(x)
        for variant in VARIANTS:
            row = {**base, "variant": variant.name, "device": variant.device}
            rows.append({**row, **run_variant(variant, case, batch, x, reference, config, timed)})
    rows.append({**base, "variant": "bound", "device": "cpu", "bytes": moved,
                 "time_us": {"median": bound, "p25": bound, "p75": bound, "n": 1}})
    add_speedups(rows)
    return rows


def layer_cases(spec: LayerSpec, sparsities, masks):
    """LayerCases of one layer: one dense module (and its torch.compile) shared, loaded with each mask's weights."""
    dense = spec.make().eval()
    torch._dynamo.reset()  # every Linear shares one forward code object: keep its recompile budget per layer
    compiled = torch.compile(dense)  # compiled once per shape; weights are graph inputs, so copies are seen
    for sparsity in sparsities:
        for mask in masks:
            masked, info = masked_layer(spec, sparsity, mask)
            with torch.no_grad():
                dense.load_state_dict({k: v for k, v in masked[0].state_dict().items() if k != "mask"})
            yield LayerCase(spec, sparsity, masked, info, dense, compiled)


def run_layers(specs: list[LayerSpec], sparsities, masks, config: TimerConfig, batches=None) -> list[dict]:
    rows, timed = [], {}
    bar = tqdm(total=len(specs) * len(sparsities) * len(masks), desc="layers", unit="case")
    for spec in specs:
        for case in layer_cases(spec, sparsities, masks):
            for batch in batches or spec.batches:
                new = run_batch(case, batch, config, timed)
                rows += new
                bar.write(summary_line(new))
            bar.update()
    bar.close()
    return rows


def summary_line(rows: list[dict]) -> str:
    head = rows[0]
    cells = []
    for r in rows:
        if "time_us" in r:
            cells.append(f"{r['variant']} {r['time_us']['median']:.0f}")
        elif "check" in r:
            cells.append(f"{r['variant']} FAILED")
    return (f"{head['layer']} {head['mask']} {head['sparsity']:.0%} B={head['batch']}: " + ", ".join(cells)
            + " (us)")
