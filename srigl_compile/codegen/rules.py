"""CPU schedule rules for the condensed kernels. A rule declines (returns None) when it does not apply.

Row rule (small batch; TVM.md "batch 1"): parallel over chunks of output rows, split the fan-in into (ko, ki),
rfactor ki so ki accumulators run as one vector, unroll ko, fold the horizontal sum and the bias into the row loop.
The gathers x[idx] are scalar loads on AVX2 (no fast gather), so wider vectors do not help much.

Col rule (large batch; TVM.md "large batch"): x as [in, B] in blocks of L lanes; parallel over (row chunk x batch
tile); the fan-in loop outermost so that, rows' indices being sorted, every row of the chunk reads a narrow band
of x that stays in cache; a small unrolled k-inner tile over a few lane blocks keeps 2 x binner accumulator
registers busy per weight broadcast.

Example:
    >>> sch = schedule(row_kernel(768, 3072, 304, "int16"), [RowRule()], RowParams())   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._tvm import tvm_modules

__all__ = ["RowParams", "ColParams", "RowRule", "ColRule", "RULES", "schedule", "LANES"]

LANES = 16  # batch lanes of the col layout: two AVX2 registers, one AVX-512 register


@dataclasses.dataclass(frozen=True)
class RowParams:
    vec: int = 8
    chunk: int = 32
    unroll: int = 16


@dataclasses.dataclass(frozen=True)
class ColParams:
    rows: int = 64
    kin: int = 8
    btile: int = 32
    binner: int = 4  # lane blocks per weight broadcast: 2 * binner accumulator registers


def _layout(func) -> str:
    return str(func.attrs["srigl.layout"]) if func.attrs is not None and "srigl.layout" in func.attrs else ""


def _fan_in(func) -> int:
    return int(func.params[1].shape[1])  # TVM 0.27: params are the buffers themselves


class RowRule:
    name = "row"
    params_type = RowParams

    def space(self, k: int) -> list[RowParams]:
        grid = [RowParams(v, c, u) for v in (4, 8, 16) for c in (8, 32, 64) for u in (8, 16)]
        return [p for p in grid if k % p.vec == 0]

    def apply(self, func, params: RowParams):
        if _layout(func) != "row" or _fan_in(func) % params.vec:
            return None
        _, _, s_tir = tvm_modules()
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
        batch, rows, red = sch.get_loops(acc)
        row_chunk, row = sch.split(rows, [None, params.chunk])
        red_outer, red_inner = sch.split(red, [None, params.vec])
        sch.reorder(row_chunk, batch, row, red_outer, red_inner)
        partial = sch.rfactor(red_inner, 0)
        loops = sch.get_loops(partial)  # row_chunk, batch, row, red_outer, red_inner
        sch.parallel(loops[0])
        sch.vectorize(loops[4])
        sch.annotate(loops[3], "pragma_auto_unroll_max_step", params.unroll)
        sch.annotate(loops[3], "pragma_unroll_explicit", 1)
        sch.reverse_compute_at(acc, loops[2])
        sch.reverse_compute_at(out, loops[2])
        sch.decompose_reduction(partial, loops[3])
        return sch


class ColRule:
    name = "col"
    params_type = ColParams

    def space(self, k: int) -> list[ColParams]:
        return [ColParams(r, i, t, b) for r in (32, 64, 128) for i in (4, 8, 16) for t in (16, 32) for b in (1, 4)]

    def apply(self, func, params: ColParams):
        if _layout(func) != "col":
            return None
        _, _, s_tir = tvm_modules()
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
        rows, blocks, lanes, red = sch.get_loops(acc)
        row_chunk, row = sch.split(rows, [None, params.rows])
        tile, block = sch.split(blocks, [None, params.btile])
        block_outer, block_inner = sch.split(block, [None, params.binner])
        red_outer, red_inner = sch.split(red, [None, params.kin])
        # Per (row, k): one broadcast of w feeds binner x 2 FMAs whose accumulators stay in registers over kin.
        sch.reorder(row_chunk, tile, red_outer, row, block_outer, red_inner, block_inner, lanes)
        work = sch.fuse(row_chunk, tile)
        sch.parallel(work)
        sch.vectorize(lanes)
        sch.unroll(block_inner)
        sch.unroll(red_inner)
        sch.reverse_compute_at(out, work)
        sch.decompose_reduction(acc, red_outer)
        sch.vectorize(sch.get_loops(out)[-1])
        return sch


RULES = {"row": RowRule(), "col": ColRule()}


def schedule(func, rules: list, params: Any):
    """The first rule that accepts ``func`` with ``params``; raises if every rule declines."""
    for rule in rules:
        if isinstance(params, rule.params_type):
            sch = rule.apply(func, params)
            if sch is not None:
                return sch
    raise ValueError(f"no schedule rule accepts layout {_layout(func)!r} with {params}")
