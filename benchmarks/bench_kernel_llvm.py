"""One condensed layer on the CPU: torch dense, torch CSR, torch gather, and the TVM kernel through the torch op.

    python benchmarks/bench_kernel_llvm.py [--threads 2] [--batches 1 256 2048] [--min-run-time 0.5] [--tune]

Layers: 90% sparse 3072->768 (k = 307) and 768->3072 (k = 76), constant fan-in, int16 indices. Every variant is
checked against the dense reference before it is timed. Times are medians of torch.utils.benchmark
blocked_autorange, called from Python: "tvm" goes through ``condensed_linear`` (what a lowered module calls: no
dispatcher in eager mode), "tvm op" through ``torch.ops.srigl_compile.tvm_condensed_linear``; both include the
layout change to [in, B] and back at large batch. "bound" = bytes the kernel must move (values, int16 indices, x,
y) / read bandwidth of a torch sum over a buffer of that size.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# torch's OpenMP threads spin after each parallel region and steal the cores TVM's pool needs; passive waiting
# lets both runtimes share the cores. Both must be set before torch / TVM start their pools.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import TimerConfig, measure, read_bandwidth, set_threads  # noqa: E402

LAYERS = [(3072, 768, 307), (768, 3072, 76)]  # (n_in, n_out, k): 90% sparse


def make_layer(n_in: int, n_out: int, k: int):
    gen = torch.Generator().manual_seed(0)
    indices = torch.rand(n_out, n_in, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    dense = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        dense.weight.zero_().scatter_(1, indices, values)
        dense.bias.copy_(bias)
    return dense, values, indices.to(torch.int16), bias


def variants(dense, values, indices, bias, handle, batch: int):
    """(label, fn) pairs, declared once; None where a variant is not run at this batch."""
    from srigl_compile.runtime.linear_op import condensed_linear
    from srigl_compile.runtime.llvm_linear import DEFAULT_COL_THRESHOLD

    csr = dense.weight.detach().to_sparse_csr()
    packed = handle.pack(values, indices)
    op = torch.ops.srigl_compile.tvm_condensed_linear
    return {
        "dense": dense,
        "csr": lambda x: torch.sparse.mm(csr, x.t()).t() + bias,
        "gather": (lambda x: (values * x[:, indices.long()]).sum(-1) + bias) if batch <= 256 else None,
        "tvm": lambda x: condensed_linear(x, *packed, bias, handle.key),
        "tvm op": lambda x: op(x, *packed, bias, handle.key, DEFAULT_COL_THRESHOLD),
    }


def run(args) -> list[dict]:
    from srigl_compile.codegen.backends.llvm import build_condensed_linear

    rows = []
    for n_in, n_out, k in LAYERS:
        dense, values, indices, bias = make_layer(n_in, n_out, k)
        handle = build_condensed_linear(n_out, n_in, k, "int16", True, tune=args.tune, progress=True)
        for batch in args.batches:
            x = torch.randn(batch, n_in)
            with torch.no_grad():
                expected = dense(x)
                times = {}
                for label, fn in variants(dense, values, indices, bias, handle, batch).items():
                    if fn is None:
                        continue
                    torch.testing.assert_close(fn(x), expected, rtol=1e-3, atol=1e-3, msg=label)
                    times[label] = measure(lambda fn=fn: fn(x), TimerConfig(args.threads, args.min_run_time))[
                        "median"]
            moved = n_out * handle.k_pad * (4 + 2) + batch * (n_in + n_out) * 4
            bound = moved / read_bandwidth(moved, args.threads) * 1e6
            rows.append({"layer": f"{n_in}->{n_out} k={k}", "batch": batch, "times_us": times, "bound_us": bound,
                         "params": f"{handle.row_params} / {handle.col_params}"})
    return rows


def print_table(rows: list[dict]) -> None:
    labels = ["dense", "csr", "gather", "tvm", "tvm op"]
    print(f"| layer | batch | {' | '.join(labels)} | bound | dense/tvm | csr/tvm |")
    print("|" + "---|" * (len(labels) + 5))
    for row in rows:
        t = row["times_us"]
        cells = [f"{t[label]:.1f}" if label in t else "-" for label in labels]
        print(f"| {row['layer']} | {row['batch']} | {' | '.join(cells)} | {row['bound_us']:.1f} | "
              f"{t['dense'] / t['tvm']:.1f}x | {t['csr'] / t['tvm']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256, 2048])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--tune", action="store_true", help="tune the kernels (records kept in the tuning cache)")
    args = parser.parse_args()
    set_threads(args.threads)
    rows = run(args)
    print(f"times in us, medians; {args.threads} threads; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print_table(rows)


if __name__ == "__main__":
    main()
