"""The paper's layer on an NVIDIA GPU: srigl_compile's CUDA kernels against cuBLAS, cuSPARSE CSR and "structured".

On the GPU machine (runtime-only TVM, kernels prebuilt here by scripts/build_gpu_bundle.py):

    bash .gpu_bundle/run.sh python benchmarks/bench_layer_cuda.py --out "$OUT"

Variants, per sparsity and batch, for the 3072 -> 768 layer (ViT-B/16 mlp.3) with SRigL constant fan-in masks:
    dense_fp32   torch F.linear, TF32 off (cuBLAS fp32)       dense_tf32   the same with TF32 on
    dense_fp16   torch F.linear in float16                    csr_fp32     torch.sparse.mm on the CSR weight
    structured   F.linear over the active neurons only (all of them unless --ablate removes some)
    lowered_fp32 / lowered_fp16   srigl_compile.lower(target="cuda"), called through the lowered module
Each variant is checked against a float64 reference before it is timed. Times are medians (with quartiles) of
``--repeats`` replays of a CUDA graph holding ``--iters`` calls (launch gaps out), after warm-up; the 1.4-6 MB of
weights stay in the GPU's L2 cache between calls, as they would inside a model's steady state (for weights
streamed from HBM see benchmarks/cuda_variants.py). Each row reports the bytes a call must move (weights, x, y)
and the rate that is against the measured device-to-device copy bandwidth, and which regime the lowered layer
ran (decode / col / dense). Results: ``OUT/layer_cuda.json`` (GPU name, versions, command) and a markdown table.
The lowered layers find their kernels prebuilt in ``$SRIGL_CUDA_KERNELS`` (set by the bundle's run.sh).

``--build-kernels DIR`` (any machine with TVM and nvcc, no GPU) lowers the same layers for sm_90 and writes their
kernels to DIR instead of timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import cuda_graph_time_us, environment  # noqa: E402

from srigl_compile import SRigLConfig, lower, sparsify  # noqa: E402

BUILD_TARGET = {"kind": "cuda", "arch": "sm_90"}  # H100 / H200: what the GPU machine lends
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_LAYER = (3072, 768)  # ViT-B/16 mlp.3, the paper's layer
DEFAULT_SPARSITIES = (0.8, 0.9, 0.95, 0.99)


def masked_layer(n_in: int, n_out: int, sparsity: float, ablate: float, seed: int = 0) -> nn.Module:
    """A sparsified Linear with uniform constant fan-in; ``ablate`` of its neurons get an empty mask row."""
    torch.manual_seed(seed)
    model = sparsify(nn.Sequential(nn.Linear(n_in, n_out)), SRigLConfig(sparsity=sparsity, distribution="uniform",
                                                                        seed=seed))
    layer = model[0]
    with torch.no_grad():
        layer.mask[: int(ablate * n_out)] = False
        layer.weight.mul_(layer.mask)
    return model.eval()


def build_handles(n_in: int = DEFAULT_LAYER[0], n_out: int = DEFAULT_LAYER[1],
                  sparsities=DEFAULT_SPARSITIES, ablate: float = 0.0) -> list:
    """Lower the benchmark's layers for sm_90 (no GPU needed); returns their CUDA kernel handles."""
    from srigl_compile.runtime.registry import get_handle

    return [get_handle(lower(masked_layer(n_in, n_out, s, ablate), target=BUILD_TARGET, dtype=dtype)[0].kernel_key)
            for s in sparsities for dtype in DTYPES.values()]


def build_kernels(args, folder: Path) -> None:
    from srigl_compile.runtime.kernel_io import export_kernels

    handles = build_handles(args.n_in, args.n_out, args.sparsities, args.ablate)
    export_kernels(handles, folder)
    print(f"wrote {len(handles)} CUDA kernels to {folder}")


def copy_bandwidth() -> float:
    """Device-to-device copy bytes (read + write) per second, the yardstick for "fraction of bandwidth"."""
    a, b = torch.empty(2**28, device="cuda", dtype=torch.uint8), torch.empty(2**28, device="cuda", dtype=torch.uint8)
    return 2 * a.numel() / (cuda_graph_time_us(lambda: b.copy_(a), 10, 5)["median_us"] * 1e-6)


def bytes_moved(name: str, batch: int, n_in: int, n_out: int, k: int, n_active: int) -> int:
    """Weights + x + y a call must move at least (4-byte fp32, 2-byte fp16 values; int16 indices)."""
    item = 2 if name.endswith("fp16") else 4
    if name.startswith("lowered"):
        weights = n_active * k * (item + 2)
    elif name.startswith("csr"):
        weights = n_active * k * (4 + 8)
    else:
        weights = n_out * n_in * item
    return weights + batch * (n_in + n_out) * item


def variants(masked: nn.Module, lowered: dict[str, nn.Module]):
    layer = masked[0]
    weight, bias = (layer.weight * layer.mask).detach().cuda(), layer.bias.detach().cuda()
    active = layer.mask.any(dim=1).cuda()
    csr = weight.to_sparse_csr()
    w16, b16 = weight.half(), bias.half()
    w_active, b_active = weight[active].contiguous(), bias[active].contiguous()

    def tf32(on: bool, fn):
        def run(x):
            torch.backends.cuda.matmul.allow_tf32 = on
            return fn(x)
        return run

    return {
        "dense_fp32": (torch.float32, tf32(False, lambda x: F.linear(x, weight, bias))),
        "dense_tf32": (torch.float32, tf32(True, lambda x: F.linear(x, weight, bias))),
        "dense_fp16": (torch.float16, lambda x: F.linear(x, w16, b16)),
        "csr_fp32": (torch.float32, tf32(False, lambda x: torch.sparse.mm(csr, x.t()).t() + bias)),
        "structured_fp32": (torch.float32, tf32(False, lambda x: F.linear(x, w_active, b_active))),
        "lowered_fp32": (torch.float32, lowered["fp32"]),
        "lowered_fp16": (torch.float16, lowered["fp16"]),
    }


TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2}  # relative to the output's largest magnitude; TF32 ~1e-3


def run(args) -> list[dict]:
    from srigl_compile.runtime.registry import get_handle

    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = []
    for sparsity in args.sparsities:
        masked = masked_layer(args.n_in, args.n_out, sparsity, args.ablate)
        lowered = {name: lower(masked, target="cuda", dtype=dtype) for name, dtype in DTYPES.items()}
        table = variants(masked, lowered)  # weights moved and converted once per sparsity, not per batch
        reference = copy.deepcopy(masked[0]).double().cuda()  # (Module.double() converts in place)
        n_active = int(masked[0].mask.any(dim=1).sum())
        k = int(masked[0].mask.sum(dim=1).max())
        handles = {name: get_handle(model[0].kernel_key) for name, model in lowered.items()}
        for batch in args.batches:
            x = torch.randn(batch, args.n_in, device="cuda")
            with torch.no_grad():
                expected = reference(x.double())
                scale = float(expected.abs().max())
                for name, (dtype, fn) in table.items():
                    xin = x.to(dtype)
                    error = float((fn(xin).double() - expected).abs().max()) / scale
                    tolerance = TOLERANCE[dtype] * (3 if name == "dense_tf32" else 1)
                    if error > tolerance:
                        raise AssertionError(f"{name} at sparsity {sparsity}, batch {batch}: relative error {error:.2e}")
                    timing = cuda_graph_time_us(lambda: fn(xin), args.iters, args.repeats)
                    moved = bytes_moved(name, batch, args.n_in, args.n_out, k, n_active)
                    regime = handles[name.split("_")[1]].regime(batch) if name.startswith("lowered") else ""
                    rows.append({"sparsity": sparsity, "batch": batch, "variant": name, "rel_error": error,
                                 "n_active": n_active, "regime": regime, "bytes": moved,
                                 "bandwidth_fraction": moved / (timing["median_us"] * 1e-6) / bandwidth, **timing})
            print(f"sparsity {sparsity} batch {batch}: " + ", ".join(
                f"{r['variant']} {r['median_us']:.1f}" for r in rows if r["batch"] == batch
                and r["sparsity"] == sparsity))
    return rows


def markdown(rows: list[dict]) -> str:
    table = {(r["sparsity"], r["batch"], r["variant"]): r["median_us"] for r in rows}
    lines = ["| sparsity | batch | dense fp32 | dense TF32 | CSR | structured | lowered fp32 | vs fp32 | vs TF32 | vs CSR "
             "| dense fp16 | lowered fp16 | vs fp16 |", "|" + "---|" * 13]
    for sparsity, batch in sorted({(r["sparsity"], r["batch"]) for r in rows}):
        t = {v: table[sparsity, batch, v] for (s, b, v) in table if (s, b) == (sparsity, batch)}
        lines.append(f"| {sparsity:.0%} | {batch} | {t['dense_fp32']:.1f} | {t['dense_tf32']:.1f} | {t['csr_fp32']:.1f} "
                     f"| {t['structured_fp32']:.1f} | {t['lowered_fp32']:.1f} | {t['dense_fp32'] / t['lowered_fp32']:.2f}x"
                     f" | {t['dense_tf32'] / t['lowered_fp32']:.2f}x | {t['csr_fp32'] / t['lowered_fp32']:.2f}x | "
                     f"{t['dense_fp16']:.1f} | {t['lowered_fp16']:.1f} | {t['dense_fp16'] / t['lowered_fp16']:.2f}x |")
    return "\n".join(lines)


def crossovers(rows: list[dict]) -> dict[str, int | None]:
    """Per sparsity: the smallest batch at which lowered fp32 is no faster than dense fp32 (None: never)."""
    result = {}
    for sparsity in sorted({r["sparsity"] for r in rows}):
        times = {(r["batch"], r["variant"]): r["median_us"] for r in rows if r["sparsity"] == sparsity}
        slower = [b for (b, v) in times if v == "lowered_fp32" and times[b, v] >= times[b, "dense_fp32"]]
        result[f"{sparsity:g}"] = min(slower) if slower else None
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="n_in", type=int, default=DEFAULT_LAYER[0])
    parser.add_argument("--out-features", dest="n_out", type=int, default=DEFAULT_LAYER[1])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--ablate", type=float, default=0.0, help="fraction of neurons with an empty mask row")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--build-kernels", type=Path, help="build the kernels for sm_90 into this folder; no timing")
    args = parser.parse_args(argv)
    if args.build_kernels:
        return build_kernels(args, args.build_kernels)
    if not torch.cuda.is_available():
        raise SystemExit("bench_layer_cuda needs a CUDA GPU (this machine has none); --build-kernels works anywhere")
    rows = run(args)
    env = environment() | {"timing": "CUDA graph replays", "gpu": torch.cuda.get_device_name(),
                           "cuda": torch.version.cuda, "capability": "sm_%d%d" % torch.cuda.get_device_capability()}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "layer": [args.n_in, args.n_out], "crossover_batch": crossovers(rows), "rows": rows}
    (args.out / "layer_cuda.json").write_text(json.dumps(result, indent=1))
    (args.out / "layer_cuda.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print("batch from which lowered fp32 is no faster than dense fp32:", result["crossover_batch"])


if __name__ == "__main__":
    main()
