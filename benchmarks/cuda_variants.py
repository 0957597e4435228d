"""Time every CUDA kernel variant of a set of layer shapes on the GPU, to choose defaults and dispatch thresholds.

Two steps, because the GPU machine has no TVM compiler:

    python benchmarks/cuda_variants.py --build .gpu_bundle/variants          # here: TVM + nvcc, no GPU
    bash .gpu_bundle/run.sh python benchmarks/cuda_variants.py --run .gpu_bundle/variants --out "$OUT"
    python benchmarks/cuda_variants.py --records OUT/cuda_variants.json      # tuning records for lower()

Each shape's variants (decode kernels per batch tile and schedule, col kernels per schedule, the expand kernel) are
compiled into one library and one fatbin. On the GPU every variant is checked against a float32 torch reference,
then timed inside a captured CUDA graph (launch gaps out) over ``copies`` rotated copies of the weights, so that
weights stream from HBM as in a whole model (more bytes than the 60 MB L2), next to dense cuBLAS on equally
rotated dense weights (fp16 / bf16; fp32 with TF32 off and on). Output: OUT/cuda_variants.json with the GPU, the
versions and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (n_out, n_in, sparsity, dtype): Llama-7B's MLP and attention shapes (decode), ViT-B/16's MLP (all batches)
SHAPES = [(11008, 4096, 0.9, "float16"), (4096, 11008, 0.9, "float16"), (4096, 4096, 0.9, "float16"),
          (11008, 4096, 0.95, "float16"), (4096, 11008, 0.95, "float16"), (768, 3072, 0.9, "float16"),
          (3072, 768, 0.9, "float16"), (768, 3072, 0.9, "float32")]
DECODE_TILES = (1, 2, 4, 8, 16)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
COL_BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 12608)
L2_BYTES = 60 * 2**20


def shape_name(n_out, n_in, sparsity, dtype) -> str:
    return f"o{n_out}_i{n_in}_s{round(sparsity * 100)}_{dtype}"


def fan_in(n_in: int, sparsity: float) -> int:
    return max(1, round(n_in * (1 - sparsity)))


def variants(n_out: int, n_in: int, k_pad: int, k: int, dtype: str):
    """(symbol, kind, tile, params as dict, PrimFunc) for every variant the rules accept."""
    from srigl_compile.codegen.cuda_kernels import col_func, decode_func, expand_func
    from srigl_compile.codegen.cuda_rules import ColRule, DecodeRule, expand_rows

    index = "int16" if n_in <= 32767 else "int32"
    out = []
    decode = DecodeRule()
    for tile in DECODE_TILES:
        for params in decode.space(tile):
            symbol = f"v_decode{tile}_" + hashlib.sha256(repr(params).encode()).hexdigest()[:8]
            sch = decode.apply(decode_func(n_out, n_in, k_pad, index, dtype, tile=tile, symbol=symbol), params)
            if sch is not None:
                out.append((symbol, "decode", tile, dataclasses.asdict(params), sch.mod["main"]))
    col = ColRule()
    for params in col.space():
        symbol = "v_col_" + hashlib.sha256(repr(params).encode()).hexdigest()[:8]
        sch = col.apply(col_func(n_out, n_in, k_pad, index, dtype, symbol=symbol), params)
        out.append((symbol, "col", 0, dataclasses.asdict(params), sch.mod["main"]))
    rows = expand_rows(n_in, dtype)
    out.append(("v_expand", "expand", 0, {"rows": rows},
                expand_func(n_out, n_in, k_pad, k, index, dtype, rows=rows, symbol="v_expand")))
    return index, out


def build(folder: Path) -> None:
    import os

    from srigl_compile.codegen._tvm_compat import import_tvm
    from srigl_compile.codegen.cuda_kernels import compile_fatbin

    tvm = import_tvm()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"  # keep the CUDA source
    for n_out, n_in, sparsity, dtype in SHAPES:
        start = time.time()
        k = fan_in(n_in, sparsity)
        k_pad = -(-k // 8) * 8
        index, found = variants(n_out, n_in, k_pad, k, dtype)
        mod = tvm.IRModule({symbol: func for symbol, _, _, _, func in found})
        target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
        executable = tvm.compile(mod, target=target)
        source = [m for m in executable.mod.imports if m.kind == "cuda"][0].inspect_source()
        name = shape_name(n_out, n_in, sparsity, dtype)
        executable.mod.export_library(str(folder / f"{name}.so"))
        (folder / f"{name}.cu").write_text(source)
        (folder / f"{name}.fatbin").write_bytes(compile_fatbin(source, "sm_90"))
        manifest.append({"name": name, "n_out": n_out, "n_in": n_in, "sparsity": sparsity, "dtype": dtype, "k": k,
                         "k_pad": k_pad, "index_dtype": index,
                         "variants": [{"symbol": s, "kind": kind, "tile": tile, "params": p}
                                      for s, kind, tile, p, _ in found]})
        print(f"{name}: {len(found)} variants in {time.time() - start:.0f} s", flush=True)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------------------------- on the GPU
def _graph_time_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` replays of a CUDA graph holding ``calls`` calls of ``fn`` (microseconds a call)."""
    from common import cuda_graph_samples_us

    return statistics.median(cuda_graph_samples_us(fn, calls, repeats))


def _layer(n_out, n_in, k, k_pad, index_dtype, dtype, seed: int):
    """Random constant-fan-in weights: values/indices padded as the library packs them, and the dense weight."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand(n_out, n_in, generator=g, device="cuda").argsort(dim=1)[:, :k].sort(dim=1).values
    values = torch.randn(n_out, k, generator=g, device="cuda") / k ** 0.5
    dense = torch.zeros(n_out, n_in, device="cuda").scatter_(1, idx, values)
    pad = k_pad - k
    values = torch.cat([values, values.new_zeros(n_out, pad)], 1)
    idx = torch.cat([idx, idx[:, -1:].expand(n_out, pad)], 1)
    bias = torch.randn(n_out, generator=g, device="cuda") * 0.1
    tdtype = getattr(torch, dtype)
    return (values.to(tdtype).contiguous(), idx.to(getattr(torch, index_dtype)).contiguous(), bias.to(tdtype),
            dense)


def run(folder: Path, out: Path, shapes: list[str] | None, repeats: int, budget_s: float = 1e9) -> None:
    import torch
    import torch.nn.functional as F

    from srigl_compile.runtime.cuda_linear import ensure_cuda_runtime, register_fatbin
    from srigl_compile.runtime.tvm_runtime import import_tvm_runtime

    tvm = import_tvm_runtime()
    ensure_cuda_runtime(tvm)
    results = []
    started = time.time()
    for entry in json.loads((folder / "manifest.json").read_text()):
        if shapes and entry["name"] not in shapes:
            continue
        if time.time() - started > budget_s:
            print(f"time budget spent: {entry['name']} and later shapes not timed", flush=True)
            break
        name, n_out, n_in, k, k_pad, dtype = (entry[f] for f in ("name", "n_out", "n_in", "k", "k_pad", "dtype"))
        register_fatbin((folder / f"{name}.cu").read_text(), (folder / f"{name}.fatbin").read_bytes())
        module = tvm.runtime.load_module(str(folder / f"{name}.so"))
        tdtype = getattr(torch, dtype)
        dense_bytes = n_out * n_in * tdtype.itemsize
        condensed_bytes = n_out * k_pad * (tdtype.itemsize + (2 if entry["index_dtype"] == "int16" else 4))
        copies = max(8, -(-2 * L2_BYTES // condensed_bytes))  # >= 8 copies, condensed ones >= 2x L2 in all
        layers = [_layer(n_out, n_in, k, k_pad, entry["index_dtype"], dtype, seed) for seed in range(copies)]
        dense_w = [d.to(tdtype) for *_, d in layers]
        print(f"== {name}: k={k}, {copies} copies, dense {dense_bytes / 2**20:.1f} MiB, condensed "
              f"{condensed_bytes / 2**20:.1f} MiB", flush=True)
        row = {**{f: entry[f] for f in ("name", "n_out", "n_in", "sparsity", "dtype", "k")}, "copies": copies,
               "dense_bytes": dense_bytes, "condensed_bytes": condensed_bytes, "timings": []}
        batches = sorted(set(DECODE_BATCHES) | (set(COL_BATCHES) if n_in <= 4096 else {8, 16, 32, 64}))
        for batch in batches:
            xs = [torch.randn(batch, n_in, device="cuda").to(tdtype) for _ in range(2)]
            ref = F.linear(xs[0].float(), layers[0][3], layers[0][2].float())
            scale = float(ref.abs().max())
            timings = {}

            def rotate(body):
                state = {"i": 0}

                def call():
                    i = state["i"] = (state["i"] + 1) % copies
                    body(i)
                return call

            ys = torch.empty(batch, n_out, device="cuda", dtype=tdtype)
            for tf32 in ((False, True) if dtype == "float32" else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                timings["dense_tf32" if tf32 else "dense"] = _graph_time_us(
                    rotate(lambda i: torch.addmm(layers[i][2], xs[i % 2], dense_w[i].t(), out=ys)), 8 * copies,
                    repeats)
            torch.backends.cuda.matmul.allow_tf32 = False
            xt = [x.t().contiguous() for x in xs]
            yt = torch.empty(n_out, batch, device="cuda", dtype=tdtype)
            scratch = torch.empty(n_out, n_in, device="cuda", dtype=tdtype)
            timings["transpose_in_out"] = _graph_time_us(
                rotate(lambda i: (xt[i % 2].copy_(xs[i % 2].t()), ys.copy_(yt.t()))), 8 * copies, repeats)
            errors = {}
            for variant in entry["variants"]:
                kind, tile, symbol = variant["kind"], variant["tile"], variant["symbol"]
                if kind == "decode" and not tile // 2 <= batch <= tile:  # each tile where it would be picked
                    continue
                if kind == "col" and batch < 8:
                    continue
                fn = module[symbol]
                if kind == "decode":
                    body = lambda i, fn=fn: fn(xs[i % 2], layers[i][0], layers[i][1], layers[i][2], ys)  # noqa: E731
                    check = lambda: (fn(xs[0], *layers[0][:3], ys), ys)[1]  # noqa: E731
                elif kind == "col":
                    body = lambda i, fn=fn: fn(xt[i % 2], layers[i][0], layers[i][1], layers[i][2], yt)  # noqa: E731
                    check = lambda: (fn(xt[0], *layers[0][:3], yt), yt.t())[1]  # noqa: E731
                else:
                    body = lambda i, fn=fn: (fn(layers[i][0], layers[i][1], scratch),  # noqa: E731
                                             torch.addmm(layers[i][2], xs[i % 2], scratch.t(), out=ys))
                    check = lambda: (body(0), ys)[1]  # noqa: E731
                got = check().float()
                torch.cuda.synchronize()
                error = float((got - ref).abs().max()) / scale
                errors[symbol] = error
                if error > (2e-2 if dtype != "float32" else 1e-4):
                    print(f"   WRONG {symbol} {variant['params']} batch {batch}: rel error {error:.2e}", flush=True)
                    continue
                timings[symbol] = _graph_time_us(rotate(body), 8 * copies, repeats)
            best = {kind: min(((t, s) for s, t in timings.items() if s.startswith(f"v_{kind}")), default=None)
                    for kind in ("decode", "col", "expand")}
            print(f"  batch {batch}: dense {timings['dense']:.1f}" +
                  (f" tf32 {timings['dense_tf32']:.1f}" if "dense_tf32" in timings else "") +
                  "".join(f", {kind} {b[0]:.1f} ({b[1]})" for kind, b in best.items() if b) +
                  f", transposes {timings['transpose_in_out']:.1f}", flush=True)
            row["timings"].append({"batch": batch, "us": timings, "rel_error": errors})
        results.append(row)
        del layers, dense_w
        torch.cuda.empty_cache()
        print(f"   ({time.time() - started:.0f} s so far)", flush=True)
        _write(out, folder, results)  # after every shape: a run cut short keeps what it measured


def _write(out: Path, folder: Path, results: list) -> None:
    import torch

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "command": " ".join(sys.argv), "timing": "CUDA-graph replay medians, weights rotated over copies"}
    manifest = {e["name"]: e for e in json.loads((folder / "manifest.json").read_text())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_variants.json").write_text(json.dumps({"environment": env, "manifest": manifest,
                                                        "results": results}, indent=1))


def records(results_file: Path, cache: Path, arch: str = "sm_90") -> list[Path]:
    """Tuning records from a timing run: per shape, the fastest decode variant of each tile, the col variant
    fastest over the col batches, and the thresholds where col or expand + cuBLAS beats decode (the end of decode)
    and where expand + cuBLAS beats col.
    ``lower(target="cuda")`` then uses them for that shape (``codegen/cuda_records.lookup``)."""
    from srigl_compile.codegen.cuda_records import CudaRecord, write_record
    from srigl_compile.runtime.cuda_params import ColParams, CudaDispatch, CudaVariants, DecodeParams
    from srigl_compile.runtime.spec import KernelSpec

    data = json.loads(Path(results_file).read_text())
    written = []
    for row in data["results"]:
        entry = data["manifest"][row["name"]]
        by_symbol = {v["symbol"]: v for v in entry["variants"]}
        timings = {t["batch"]: t["us"] for t in row["timings"]}

        def best(kind, batch, tile=None):
            found = [(us, s) for s, us in timings.get(batch, {}).items() if s in by_symbol
                     and by_symbol[s]["kind"] == kind and (tile is None or by_symbol[s]["tile"] == tile)]
            return min(found) if found else None

        decode = []
        for tile in sorted({v["tile"] for v in entry["variants"] if v["kind"] == "decode"}):
            wins = [best("decode", b, tile) for b in timings if b <= tile and best("decode", b, tile)]
            if wins:
                symbol = min(wins)[1]
                decode.append((tile, DecodeParams(**by_symbol[symbol]["params"])))
        col_symbols = [v["symbol"] for v in entry["variants"] if v["kind"] == "col"]
        col_batches = [b for b in timings if any(s in timings[b] for s in col_symbols)]
        col_symbol = min(col_symbols, key=lambda s: sum(timings[b].get(s, 1e9) for b in col_batches))
        decode_best = {b: best("decode", b) for b in timings}
        col_time = {b: timings[b].get(col_symbol) for b in timings}
        dense_time = {b: timings[b]["v_expand"] for b in timings if "v_expand" in timings[b]}
        # Decode runs below col_from: up to the first batch where it is missing, or beaten by col or by expand +
        # cuBLAS (on the H200's fp16 3072->768, expand + cuBLAS beat decode from 16 while col never did).
        others = {b: min(t for t in (col_time[b], dense_time.get(b)) if t) for b in timings
                  if col_time[b] or dense_time.get(b)}
        col_from = min((b for b in sorted(timings) if b in others and (decode_best[b] is None
                                                                        or others[b] < decode_best[b][0])),
                       default=max(timings) + 1)
        dense_from = min((b for b in sorted(dense_time) if col_time.get(b) and dense_time[b] < col_time[b]),
                         default=0)
        tiles = tuple(t for t, _ in decode)
        record = CudaRecord(CudaVariants(tuple(decode), ColParams(**by_symbol[col_symbol]["params"])),
                            CudaDispatch(tiles, col_from, dense_from, f"measured {data['environment']['gpu']}"))
        # (a record is per padded shape and dtype: the index dtype and the bias do not name it)
        spec = KernelSpec(entry["n_out"], entry["n_in"], entry["k_pad"], "int32", True, entry["dtype"])
        written.append(write_record(cache, spec, arch, record, {"results": str(results_file),
                                                                **data["environment"]}))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="compile the variants into this folder (no GPU needed)")
    parser.add_argument("--run", type=Path, help="time the variants of this folder (on the GPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shapes", nargs="*", help="only these shape names")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    parser.add_argument("--records", type=Path, help="write tuning records from this cuda_variants.json")
    parser.add_argument("--cache", type=Path, help="records folder (default: the tuning cache)")
    args = parser.parse_args()
    if args.build:
        build(args.build)
    if args.run:
        run(args.run, args.out, args.shapes, args.repeats, args.budget_s)
    if args.records:
        from srigl_compile.codegen.tuning import default_cache_dir

        for path in records(args.records, args.cache or default_cache_dir()):
            print("wrote", path)


if __name__ == "__main__":
    main()
