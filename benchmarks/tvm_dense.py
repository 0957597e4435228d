"""TVM's own dense kernel for a layer: y = x @ W^T + b as a TE matmul scheduled for the host CPU.

    python benchmarks/tvm_dense.py            # checks it against torch on a 3072->768 layer and times both

Why it exists: the layer benchmark compares srigl_compile's condensed kernels with torch, and also with what the
same compiler (TVM 0.27, the same llvm target as ``host_llvm_target()``) makes of the dense layer, so a speed-up
is not just "TVM against oneDNN".

The kernel follows TVM's "How to optimize GEMM on CPU" recipe:
    y[b, o] = bias[o] + sum_i x[b, i] * wp[o // BN, i, o % BN]       wp: W packed once into [n_out / BN, n_in, BN]
Step 1: tile (MB batch rows x BN outputs), the packed weight's BN lanes innermost (one contiguous vector load per
input for BN outputs) and the MB x BN accumulators in registers. Step 2: split the reduction by KU and unroll it.
Step 3: parallel over (output tile, batch tile), so batch 1 still has n_out / BN tasks. Step 4: add the bias and
store per tile. The batch is compiled in (one kernel per row count, ~0.1 s each): with a symbolic batch the
predicated batch tile cost 2-3x at batch 1.
"""

from __future__ import annotations

import functools

import torch

BN = 16  # output lanes per tile: 2 AVX2 vectors of fp32
KU = 4  # reduction unroll


def batch_tile(rows: int) -> int:
    """Batch rows per register tile: 4 x 2 vectors = 8 accumulators (AVX2 has 16 registers); 1 for tiny batches."""
    return 4 if rows >= 4 else 1


def dense_func(rows: int, n_in: int, n_out: int):
    """PrimFunc ``f(x[rows, n_in], wp[n_out/BN, n_in, BN], bias[n_out], y[rows, n_out])``."""
    from srigl_compile.codegen._tvm_compat import import_tvm

    te = import_tvm().te
    x = te.placeholder((rows, n_in), "float32", name="x")
    wp = te.placeholder((n_out // BN, n_in, BN), "float32", name="wp")
    bias = te.placeholder((n_out,), "float32", name="bias")
    r = te.reduce_axis((0, n_in), name="r")
    # a zero-init reduction and a separate bias block: te.sum(init=bias) is silently dropped (TVM.md)
    acc = te.compute((rows, n_out), lambda b, o: te.sum(x[b, r] * wp[o // BN, r, o % BN], axis=r), name="acc")
    y = te.compute((rows, n_out), lambda b, o: acc[b, o] + bias[o], name="y")
    return te.create_prim_func([x, wp, bias, y]).with_attr("global_symbol", "bench_dense")


def schedule(func, rows: int):
    from srigl_compile.codegen._tvm_compat import import_tvm

    sch = import_tvm().s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    b, o, r = sch.get_loops(acc)
    bo, bi = sch.split(b, [None, batch_tile(rows)])
    oo, oi = sch.split(o, [None, BN])
    ro, ri = sch.split(r, [None, KU])
    sch.reorder(oo, bo, ro, ri, bi, oi)
    work = sch.fuse(oo, bo)
    sch.parallel(work)
    sch.vectorize(oi)
    sch.unroll(ri)
    sch.unroll(bi)
    sch.reverse_compute_at(sch.get_sblock("y"), work)
    sch.set_scope(acc, 0, "local")  # the MB x BN tile stays in registers
    sch.decompose_reduction(acc, ro)
    return sch


@functools.cache
def compiled(rows: int, n_in: int, n_out: int):
    """The compiled kernel for one shape (weights are runtime arguments: every mask reuses it)."""
    from srigl_compile.codegen._tvm_compat import import_tvm
    from srigl_compile.codegen.cpu_target import host_llvm_target

    tvm = import_tvm()
    sch = schedule(dense_func(rows, n_in, n_out), rows)
    return tvm.compile(sch.mod, target=tvm.target.Target(host_llvm_target())).mod["bench_dense"]


class TVMDense:
    """A dense layer on TVM's kernel; call it like ``nn.Linear`` on float32 [B, n_in] CPU tensors (zero-copy:
    torch tensors are passed to the compiled function as they are). Compiles per row count on first use."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.n_out, self.n_in = weight.shape
        if self.n_out % BN:
            raise ValueError(f"the TVM dense kernel needs n_out divisible by {BN}, got {self.n_out}")
        self.packed = weight.detach().float().reshape(self.n_out // BN, BN, self.n_in).permute(0, 2, 1).contiguous()
        self.bias = bias.detach().float().contiguous() if bias is not None else weight.new_zeros(self.n_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(x.shape[0], self.n_out)
        compiled(x.shape[0], self.n_in, self.n_out)(x.contiguous(), self.packed, self.bias, y)
        return y


if __name__ == "__main__":
    import os
    import sys
    from pathlib import Path

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import TimerConfig, measure, set_threads

    set_threads(2)
    layer = torch.nn.Linear(3072, 768)
    dense = TVMDense(layer.weight, layer.bias)
    for batch in (1, 7, 256, 2048):
        x = torch.randn(batch, 3072)
        with torch.no_grad():
            torch.testing.assert_close(dense(x), layer(x), rtol=1e-4, atol=1e-4)
            times = [measure(lambda f=f: f(x), TimerConfig())["median"] for f in (layer, dense)]
        print(f"batch {batch}: torch {times[0]:.1f} us, tvm {times[1]:.1f} us")
