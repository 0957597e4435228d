"""An experiment: what ResNet-50's 1x1 layers would gain if each group of g output rows shared one list of k inputs.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/grouped_columns.py [--rounds 15]

SRigL gives every row its own k columns, so the library's 1x1 kernel gathers each row's inputs on its own and is
bound by the L2 (``column_order.py``). With a list shared by a group of g rows (a structure SRigL does not have: the
training would have to choose columns per group), a layer is a gather of each group's k input channels, then a
dense [g, k] x [k, pixels] product per group. Timed on the same shapes in one process, medians of ``--rounds``:
- "library": the library's kernel on each row's own random columns (as ``column_order.py``'s "random"), ReLU;
- "grouped g": torch's ``index_select`` of each group's k channels and ``bmm`` over the groups (no epilogue);
- "dense": torch's ``mm`` of the whole dense layer (the work the sparse layer replaces).
Every variant is checked against torch on the same operands first. Nothing of it is in the library.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from column_order import KIN, RIN, ROWS, SHAPES, columns_of  # noqa: E402
from offset_nests import each_shape, nest, timed_us  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from srigl_compile.codegen.kernels import offset_kernel  # noqa: E402
from srigl_compile.runtime.conv_geometry import aligned_plane, column_offsets, direct_plan, planar_plan  # noqa: E402
from srigl_compile.runtime.spec import block_rows  # noqa: E402

GROUPS = (8, 16, 32)


def torch_us(fn, rounds: int) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return statistics.median(timer.blocked_autorange(min_run_time=0.05).median for _ in range(rounds)) * 1e6


def run(shape, rounds: int, target) -> None:
    n_out, n_in, k, image, lanes = shape
    gen = torch.Generator().manual_seed(0)
    plan = direct_plan(image, image, (1, 1), (0, 0), (1, 1), lanes)
    plan = planar_plan(plan, aligned_plane(max(plan.tiles * lanes, plan.positions)))
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(1, n_in * plan.plane, generator=gen)
    columns = columns_of("random", n_out, n_in, k, gen)
    offsets = column_offsets(columns, (1, 1), (1, 1), plan, n_in).contiguous()
    y = torch.zeros(1, n_out, plan.tiles, lanes)
    library = nest(offset_kernel(n_out, k, lanes, True, "order", ROWS, KIN, "relu"), False, RIN)
    results = {"library": timed_us(library, (x, block_rows(values, ROWS, KIN), block_rows(offsets, ROWS, KIN), bias,
                                             y), rounds, target)}
    grid = x.view(n_in, plan.plane)[columns][:, :, : plan.tiles * lanes]
    torch.testing.assert_close(y[0].reshape(n_out, -1),
                               torch.relu(torch.einsum("ok,okp->op", values, grid) + bias[:, None]), rtol=1e-4,
                               atol=1e-4)
    pixels = torch.randn(n_in, image * image, generator=gen)
    for g in GROUPS:
        groups = n_out // g
        shared = torch.stack([columns_of("shared", 1, n_in, k, gen)[0] for _ in range(groups)])
        weights, flat = torch.randn(groups, g, k, generator=gen), shared.reshape(-1)

        def grouped(weights=weights, flat=flat, groups=groups):
            return torch.bmm(weights, pixels.index_select(0, flat).view(groups, k, -1))

        dense_w = torch.zeros(groups, g, n_in).scatter_(2, shared[:, None, :].expand(groups, g, k), weights)
        torch.testing.assert_close(grouped().reshape(n_out, -1), dense_w.reshape(n_out, n_in) @ pixels, rtol=1e-4,
                                   atol=1e-3)
        results[f"grouped {g}"] = torch_us(grouped, rounds)
    dense = torch.randn(n_out, n_in, generator=gen)
    results["dense"] = torch_us(lambda: torch.mm(dense, pixels), rounds)
    flops = 2 * n_out * k * image * image
    print(f"{n_out}x{n_in} k{k} {image}x{image}: " + ", ".join(
        f"{name} {us:6.1f} us" + (f" ({flops / us / 1e3:4.0f} GFLOP/s)" if name != "dense" else
                                  f" ({2 * n_out * n_in * image * image / us / 1e3:4.0f} GFLOP/s)")
        for name, us in results.items()), flush=True)


def main() -> None:
    each_shape(__doc__.splitlines()[0], SHAPES, run)


if __name__ == "__main__":
    main()
