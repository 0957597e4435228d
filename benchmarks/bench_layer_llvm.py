"""One sparse layer on the CPU: dense, CSR, torch gather, srigl_compile lowered (llvm), and the bandwidth bound.

    python benchmarks/bench_layer_llvm.py [--in 3072 --out 768] [--sparsities 0.8 0.9 0.95 0.99]
                                          [--batches 1 256 2048] [--threads 2] [--tune] [--quick]

Every variant is checked against the dense reference before it is timed; times are medians of
torch.utils.benchmark blocked_autorange, called from Python through the module (call overhead included; at
large batch the lowered layer's layout change to [in, B] and back is included). The bound is the bytes the
kernel must move (values, int16/int32 indices, x, y) divided by the read bandwidth measured on a buffer of the
same size. Results go to benchmarks/results/layer_llvm.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# torch's OpenMP threads spin after each parallel region and steal the cores TVM's pool needs (a lowered layer
# ran 2-4x slower next to them); passive waiting lets both runtimes share 2 cores. Applies to every variant.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from common import save_results  # noqa: E402

from srigl_compile import SRigLConfig, condense, lower, sparsify  # noqa: E402


def median_us(fn, threads: int, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def read_bandwidth(n_bytes: int, threads: int) -> float:
    """Bytes/s of summing a float32 buffer of n_bytes (cache-resident when it fits)."""
    buf = torch.randn(max(n_bytes // 4, 1024))
    seconds = median_us(lambda: buf.sum(), threads, 0.2) / 1e6
    return buf.numel() * 4 / seconds


def variants(masked: nn.Module, lowered: nn.Module, condensed: nn.Module, batch: int):
    layer = masked[0]
    dense = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    csr = layer.weight.detach().to_sparse_csr()
    bias = layer.bias.detach()
    table = {
        "dense": dense,
        "csr": lambda x: torch.sparse.mm(csr, x.t()).t() + bias,
        "gather": condensed if batch <= 64 else None,  # [B, n, k] gathers: gigabytes at large batch
        "lowered": lowered,
    }
    return {name: fn for name, fn in table.items() if fn is not None}


def bound_us(lowered: nn.Module, n_in: int, batch: int, threads: int) -> float:
    layer = lowered[0]
    moved = (layer.values.numel() * 4 + layer.indices.numel() * layer.indices.element_size()
             + batch * n_in * 4 + batch * layer.n_out * 4)
    return moved / read_bandwidth(moved, threads) * 1e6


CONVS = {  # ResNet-50 layer4 shapes at 224x224 input: 7x7 feature maps
    "layer4 3x3 512->512": dict(in_channels=512, out_channels=512, kernel_size=3, padding=1),
    "layer4 1x1 2048->512": dict(in_channels=2048, out_channels=512, kernel_size=1),
}


def conv_rows(args) -> list[dict]:
    """Lowered (im2col + condensed kernel) against torch's dense conv, at 90% and batch 1 / 32."""
    rows = []
    print(f"\nconvolutions, 7x7 maps, 90% sparse, median us per call\n{'layer':<22} {'batch':>5} {'dense':>9} "
          f"{'lowered':>9} {'x dense':>8}")
    for name, shape in CONVS.items():
        torch.manual_seed(0)
        masked = sparsify(nn.Sequential(nn.Conv2d(**shape)), SRigLConfig(sparsity=0.9, distribution="uniform"))
        masked.eval()
        lowered = lower(masked, progress=False)
        for batch in (1, 32):
            x = torch.randn(batch, shape["in_channels"], 7, 7)
            with torch.no_grad():
                torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
                times = {v: median_us(lambda m=m: m(x), args.threads, args.min_run_time)
                         for v, m in (("dense", masked), ("lowered", lowered))}
            rows.append({"layer": name, "sparsity": 0.9, "batch": batch, "times_us": times,
                         "speedup_vs_dense": times["dense"] / times["lowered"]})
            print(f"{name:<22} {batch:>5} {times['dense']:>9.1f} {times['lowered']:>9.1f} "
                  f"{times['dense'] / times['lowered']:>7.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="n_in", type=int, default=3072)
    parser.add_argument("--out", dest="n_out", type=int, default=768)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--tune", action="store_true", help="search schedule variants (records are cached)")
    parser.add_argument("--quick", action="store_true", help="90%% only, batches 1 and 256, short timings")
    parser.add_argument("--conv", action="store_true", help="also time ResNet-50 layer4 convolutions (im2col)")
    args = parser.parse_args()
    if args.quick:
        args.sparsities, args.batches, args.min_run_time = [0.9], [1, 256], 0.1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    rows = []
    header = f"{'sparsity':>8} {'batch':>5} {'dense':>9} {'csr':>9} {'gather':>9} {'lowered':>9} {'bound':>8} " \
             f"{'x dense':>8} {'x csr':>7}"
    print(f"{args.n_in}->{args.n_out} layer, fp32, {args.threads} threads, median us per call")
    print(header)
    for sparsity in args.sparsities:
        torch.manual_seed(0)
        masked = sparsify(nn.Sequential(nn.Linear(args.n_in, args.n_out)),
                          SRigLConfig(sparsity=sparsity, distribution="uniform")).eval()
        condensed = condense(masked)
        lowered = lower(masked, tune=args.tune, progress=True)
        for batch in args.batches:
            x = torch.randn(batch, args.n_in)
            with torch.no_grad():
                reference = F.linear(x, masked[0].weight, masked[0].bias)
                times = {}
                for name, fn in variants(masked, lowered, condensed, batch).items():
                    torch.testing.assert_close(fn(x), reference, rtol=1e-4, atol=1e-4)  # correct before timed
                    times[name] = median_us(lambda fn=fn: fn(x), args.threads, args.min_run_time)
            bound = bound_us(lowered, args.n_in, batch, args.threads)
            row = {"sparsity": sparsity, "batch": batch, "k": int(condensed[0].k), "times_us": times,
                   "bound_us": bound, "speedup_vs_dense": times["dense"] / times["lowered"],
                   "speedup_vs_csr": times["csr"] / times["lowered"]}
            rows.append(row)
            gather = f"{times['gather']:>9.1f}" if "gather" in times else f"{'-':>9}"
            print(f"{sparsity:>8.2f} {batch:>5} {times['dense']:>9.1f} {times['csr']:>9.1f} {gather} "
                  f"{times['lowered']:>9.1f} {bound:>8.1f} {row['speedup_vs_dense']:>7.2f}x "
                  f"{row['speedup_vs_csr']:>6.2f}x")
    if args.conv:
        rows += conv_rows(args)
    path = save_results("layer_llvm", rows, {"args": vars(args)})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
