"""An experiment: how much a 1x1 offset kernel loses to its rows' random columns, and whether reading the input
block by block wins it back.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/column_order.py [--rounds 15]

ResNet-50's middle 1x1 shapes at 90% ERK (k as ERK gives them, rounded to 8), kernel alone, hot, median of TVM's
time_evaluator; every variant checked against torch on the same operands first. Columns:
- "random": each row its own sorted random columns (what a trained layer looks like);
- "balanced N": each row k / N random columns in each of N equal blocks of inputs (a column order that a
  block-by-block kernel would need; drawn, not trained);
- "shared": one list for every row (each input vector loaded once serves every row: the ceiling);
- "segmented": random columns, run by a column-block kernel written here in TVMScript: for each block of ``cb``
  input channels, each row's non-zeros in that block (a contiguous segment of its sorted list) with its
  accumulators in registers, so a task's input band is exactly ``cb`` channels (variable trip counts per segment).
The library's kernel ("random", "balanced", "shared") is the k-tile-outer nest the rules give a layer with its own
offsets (32 rows, k-tiles of 8, 2 rows interleaved). Nothing of it is in the library (see RESULTS.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from offset_nests import each_shape, nest, timed_us  # noqa: E402

from srigl_compile.codegen._tvm_compat import import_tvm  # noqa: E402
from srigl_compile.codegen.kernels import offset_kernel  # noqa: E402
from srigl_compile.runtime.conv_geometry import aligned_plane, column_offsets, direct_plan, planar_plan  # noqa: E402
from srigl_compile.runtime.spec import block_rows  # noqa: E402

# (n_out, n_in, k, image, lanes): stage 3's conv1 and conv3, stage 2's, stage 4's (lanes as the backend tiles them)
SHAPES = [(256, 1024, 240, 14, 208), (1024, 256, 64, 14, 208), (128, 512, 240, 28, 112), (512, 128, 64, 28, 112),
          (512, 2048, 240, 7, 64), (2048, 512, 64, 7, 64)]
ROWS, KIN, RIN = 32, 8, 2
SEGMENT_ROWS = 16


def segmented_func(rows: int, lanes: int):
    """The column-block kernel (module docstring): f(x [B, L], w [n_out, k], off [n_out, k] int32, seg [n_out,
    blocks + 1] int32, bias [n_out], y [B, n_out, NT, lanes]), ReLU epilogue."""
    import_tvm()
    from tvm.script import tirx as T

    vectors = lanes // 16

    @T.prim_func
    def segmented(x_h: T.handle, w_h: T.handle, off_h: T.handle, seg_h: T.handle, bias_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "segmented", "tirx.noalias": True})
        batch, length, n_out, k, edges, tiles = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (batch, length), "float32")
        w = T.match_buffer(w_h, (n_out, k), "float32")
        off = T.match_buffer(off_h, (n_out, k), "int32")
        seg = T.match_buffer(seg_h, (n_out, edges), "int32")
        bias = T.match_buffer(bias_h, (n_out,), "float32")
        y = T.match_buffer(y_h, (batch, n_out, tiles, lanes), "float32")
        blocks = n_out // rows
        for task in T.parallel(batch * tiles * blocks):
            image = task // (tiles * blocks)
            tile = task // blocks % tiles
            block = task % blocks
            sums = T.alloc_buffer((rows, lanes), "float32")
            for o, lane in T.grid(T.int64(rows), T.int64(lanes)):
                sums[o, lane] = T.float32(0)
            for column_block in range(edges - 1):
                for o in range(T.int64(rows)):
                    row = block * rows + o
                    acc = T.alloc_buffer((lanes,), "float32", scope="local")
                    for v in T.unroll(T.int64(vectors)):  # (16-lane loops: one 208-lane vector spilled)
                        for lane in T.vectorized(T.int64(16)):
                            acc[v * 16 + lane] = sums[o, v * 16 + lane]
                    first, end = seg[row, column_block], seg[row, column_block + 1]
                    for r in range(T.Cast("int64", first), T.Cast("int64", end)):
                        start = T.Cast("int64", off[row, r]) + tile * lanes
                        weight = w[row, r]
                        for v in T.unroll(T.int64(vectors)):
                            for lane in T.vectorized(T.int64(16)):
                                acc[v * 16 + lane] = acc[v * 16 + lane] + weight * x[image, start + v * 16 + lane]
                    for v in T.unroll(T.int64(vectors)):
                        for lane in T.vectorized(T.int64(16)):
                            sums[o, v * 16 + lane] = acc[v * 16 + lane]
            for o in range(T.int64(rows)):
                for lane in T.vectorized(T.int64(lanes)):  # (no let-bound value here: TVM made it one scalar)
                    y[image, block * rows + o, tile, lane] = T.if_then_else(
                        sums[o, lane] + bias[block * rows + o] < T.float32(0), T.float32(0),
                        sums[o, lane] + bias[block * rows + o])

    return segmented


def columns_of(kind: str, n_out: int, n_in: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "shared":
        return torch.rand(1, n_in, generator=gen).argsort(1)[:, :k].sort(1).values.repeat(n_out, 1)
    blocks = int(kind.split()[1]) if kind.startswith("balanced") else 1
    per, width = k // blocks, n_in // blocks
    parts = [torch.rand(n_out, width, generator=gen).argsort(1)[:, :per] + b * width for b in range(blocks)]
    return torch.cat(parts, 1).sort(1).values


def segments(columns: torch.Tensor, n_in: int, cb: int) -> torch.Tensor:
    """seg[o, b]: the first r with columns[o, r] >= b * cb, for b = 0 .. ceil(n_in / cb) (the last edge n_in)."""
    edges = torch.cat([torch.arange(0, n_in, cb), torch.tensor([n_in])])
    return torch.searchsorted(columns.contiguous(), edges.expand(columns.shape[0], -1).contiguous()).int()


def run(shape, rounds: int, target) -> None:
    n_out, n_in, k, image, lanes = shape
    plan = direct_plan(image, image, (1, 1), (0, 0), (1, 1), lanes)
    plan = planar_plan(plan, aligned_plane(max(plan.tiles * lanes, plan.positions)))
    gen = torch.Generator().manual_seed(0)
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(1, n_in * plan.plane, generator=gen)
    library = nest(offset_kernel(n_out, k, lanes, True, "order", ROWS, KIN, "relu"), False, RIN)
    tvm = import_tvm()
    segmented = tvm.compile(tvm.IRModule({"segmented": segmented_func(SEGMENT_ROWS, lanes)}),
                            target=tvm.target.Target(dict(target)))
    cb = max(8, 24 * 1024 // (lanes * 4))  # (a block of inputs in ~24 KiB: half the L1)
    kinds = ["random", "balanced 4", "balanced 16", "shared"]
    results = {}
    for kind in kinds:
        columns = columns_of(kind, n_out, n_in, k, gen)
        offsets = column_offsets(columns, (1, 1), (1, 1), plan, n_in).contiguous()
        grid = x.view(n_in, plan.plane)[columns][:, :, : plan.tiles * lanes]
        reference = torch.relu(torch.einsum("ok,okp->op", values, grid) + bias[:, None])
        y = torch.zeros(1, n_out, plan.tiles, lanes)
        results[kind] = timed_us(library, (x, block_rows(values, ROWS, KIN), block_rows(offsets, ROWS, KIN), bias, y),
                                 rounds, target)
        torch.testing.assert_close(y[0].reshape(n_out, -1), reference, rtol=1e-4, atol=1e-4)
        if kind == "random":
            y.zero_()
            tensors = [tvm.runtime.from_dlpack(t) for t in (x, values, offsets.int().contiguous(),
                                                           segments(columns, n_in, cb), bias, y)]
            segmented.mod["segmented"](*tensors)
            torch.testing.assert_close(y[0].reshape(n_out, -1), reference, rtol=1e-4, atol=1e-4)
            evaluator = segmented.mod.time_evaluator("segmented", tvm.cpu(), number=10, repeat=rounds,
                                                     min_repeat_ms=20)
            results[f"segmented (cb {cb})"] = float(np.median(evaluator(*tensors).results)) * 1e6
    flops = 2 * n_out * k * image * image
    print(f"{n_out}x{n_in} k{k} {image}x{image} lanes {lanes}: " + ", ".join(
        f"{kind} {us:6.1f} us ({flops / us / 1e3:4.0f} GFLOP/s)" for kind, us in results.items()), flush=True)


def main() -> None:
    each_shape(__doc__.splitlines()[0], SHAPES, run)


if __name__ == "__main__":
    main()
