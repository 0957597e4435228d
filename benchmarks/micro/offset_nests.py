"""The offset (direct convolution) kernel's two loop nests on one shape, kernel alone: k-tile outer (the task's
[rows, lanes] accumulators in a workspace) against row-stationary (each row group's accumulators in registers over
its whole k; what ``codegen.rules`` gives rows sharing offsets).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/offset_nests.py [--rounds 15]

For ResNet-50's near-dense shapes (shared offsets, 4 rows) and some with their own offsets (share 1), builds both
nests with the rules' own helpers, checks both against a torch reference on the same operands, and prints each
one's median time (TVM's time_evaluator) and useful GFLOP/s. Random distinct sorted columns per row; each shared
group reads its first row's list (timing only: the packing that builds the real union is tested elsewhere).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from srigl_compile.codegen._tvm_compat import import_tvm  # noqa: E402
from srigl_compile.codegen.cpu_target import check_llvm_target  # noqa: E402
from srigl_compile.codegen.kernels import offset_kernel  # noqa: E402
from srigl_compile.codegen.rules import _k_tile_outer, _row_stationary  # noqa: E402
from srigl_compile.runtime.conv_geometry import aligned_plane, column_offsets, direct_plan, planar_plan  # noqa: E402
from srigl_compile.runtime.spec import block_rows  # noqa: E402

# (n_out, n_in = C * kh * kw, k, kernel, image, lanes, share): ResNet-50 at 90% ERK
SHAPES = [(256, 64, 64, 1, 56, 64, 4), (64, 64, 64, 1, 56, 64, 4), (64, 256, 248, 1, 56, 64, 4),
          (256, 64, 64, 1, 14, 64, 4), (64, 576, 104, 3, 56, 64, 1), (128, 1152, 104, 3, 28, 64, 1),
          (2048, 512, 64, 1, 7, 64, 1)]


def nest(func, row_stationary: bool, rin: int):
    """The offset kernel ``func`` scheduled with one of the rule's two nests (whatever the rule would choose)."""
    sch = import_tvm().s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    image, tile, block, rows, lanes, red_outer, red_inner = sch.get_loops(acc)
    schedule = _row_stationary if row_stationary else _k_tile_outer
    return schedule(sch, acc, (image, tile, block), rows, lanes, red_outer, red_inner, rin).mod["main"]


def timed_us(func, tensors, rounds: int, target) -> float:
    """Median microseconds of the scheduled offset kernel ``func`` on ``tensors`` (TVM's time_evaluator)."""
    tvm = import_tvm()
    symbol = str(func.attrs["global_symbol"])
    executable = tvm.compile(tvm.IRModule({symbol: func}), target=tvm.target.Target(dict(target)))
    evaluator = executable.mod.time_evaluator(symbol, tvm.cpu(), number=10, repeat=rounds, min_repeat_ms=20)
    return float(np.median(evaluator(*[tvm.runtime.from_dlpack(t) for t in tensors]).results)) * 1e6


def setup(description: str) -> tuple[argparse.Namespace, dict]:
    """(--rounds and --threads parsed, the host's llvm target), threads set for TVM and torch."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    return args, check_llvm_target(None)


def run(shape, rounds: int, target) -> None:
    n_out, n_in, k, kernel, image, lanes, share = shape
    plan = direct_plan(image, image, (kernel, kernel), (kernel // 2,) * 2, (1, 1), lanes)
    if kernel == 1:
        plan = planar_plan(plan, aligned_plane(max(plan.tiles * lanes, plan.positions)))
    gen = torch.Generator().manual_seed(0)
    columns = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
    offsets = column_offsets(columns, (kernel, kernel), (1, 1), plan, n_in)[::share].contiguous()
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(1, n_in // kernel**2 * plan.plane, generator=gen)
    grid = torch.arange(plan.tiles * lanes)
    reference = torch.relu((values[:, :, None] * x[0][offsets.repeat_interleave(share, 0).long()[:, :, None]
                                                        + grid]).sum(1) + bias[:, None])
    rin = share if share > 1 else 2
    timings = []
    for row_stationary in (False, True):
        func = nest(offset_kernel(n_out, k, lanes, True, "nest", 32, 8, "relu", share=share), row_stationary, rin)
        y = torch.zeros(1, n_out, plan.tiles, lanes)
        micros = timed_us(func, (x, block_rows(values, 32, 8), block_rows(offsets, 32 // share, 8), bias, y), rounds,
                          target)
        torch.testing.assert_close(y[0].reshape(n_out, -1), reference, rtol=1e-4, atol=1e-4)
        timings.append(micros)
    flops = 2 * n_out * k * plan.out_h * plan.out_w
    (outer, stationary) = timings
    print(f"{n_out}x{n_in} k{k} {kernel}x{kernel} {image}x{image} lanes {lanes} share {share}: k-tile outer "
          f"{outer:7.1f} us ({flops / outer / 1e3:4.0f} GFLOP/s), row-stationary {stationary:7.1f} us "
          f"({flops / stationary / 1e3:4.0f} GFLOP/s): {outer / stationary:.2f}x", flush=True)


def each_shape(description: str, shapes, run) -> None:
    """``run(shape, rounds, target)`` for each shape, with --rounds and --threads parsed (``setup``)."""
    args, target = setup(description)
    for shape in shapes:
        run(shape, args.rounds, target)


def main() -> None:
    each_shape(__doc__.splitlines()[0], SHAPES, run)


if __name__ == "__main__":
    main()
