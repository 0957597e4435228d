"""The batch-tiled linear kernels at chosen row counts: what a 64-lane col tile costs against 8-lane mid tiles.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/batch_tiles.py [--rows 8 16 32 48 64 192 197 256] [--rounds 3]

For ViT-B's fc2 (3072->768), fc1 (768->3072) and qkv (768->2304) at 90% (int16 indices), times the kernel through
``condensed_linear`` (what a lowered layer calls) with the mid kernel forced (``col_threshold`` above the rows)
and with the default dispatch, and prints each count's fastest median over ``--rounds`` rounds, in microseconds.
This is where the ragged-tail rule in ``KernelHandle.launch`` comes from: 197 rows on four 64-lane tiles cost as
much as 256, while three tiles plus one 8-lane tile cost about 3.2 tiles.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from srigl_compile.codegen.backends.llvm import build_condensed_linear  # noqa: E402
from srigl_compile.runtime.linear_op import condensed_linear  # noqa: E402

LAYERS = {"fc2": (768, 3072, 307), "fc1": (3072, 768, 76), "qkv": (2304, 768, 76)}  # (n_out, n_in, k)


def median_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 48, 64, 192, 197, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    for name, (n_out, n_in, k) in LAYERS.items():
        handle = build_condensed_linear(n_out, n_in, k, "int16", True)
        gen = torch.Generator().manual_seed(0)
        indices = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
        values, indices = handle.pack(torch.randn(n_out, k, generator=gen), indices)
        bias = torch.randn(n_out, generator=gen)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for rows in args.rows:
                x = torch.randn(rows, n_in, generator=gen)
                for label, threshold in (("mid", 10**9), ("default", None)):
                    kwargs = {} if threshold is None else {"col_threshold": threshold}
                    key = f"{label} {rows}"
                    us = median_us(lambda: condensed_linear(x, values, indices, bias, handle.key, **kwargs), args.calls)
                    best[key] = min(best.get(key, float("inf")), us)
        print(f"{name} ({n_in}->{n_out}, k={k}): " + ", ".join(f"{key}: {us:.0f}" for key, us in best.items()))


if __name__ == "__main__":
    main()
