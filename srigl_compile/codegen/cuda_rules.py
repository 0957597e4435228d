"""CUDA schedule rules for the condensed kernels: ``rule.apply(func, params) -> Schedule | None``.

Like the CPU rules (``rules.py``), a rule declines (None) when the function is not its layout or the variant does
not fit the shape: the decode rule declines when the staged x tile would not fit in shared memory, or TVM cannot
schedule it. Each rule offers ``space(...)`` (the variants a GPU timing run compares) and ``default(...)``.

Decode rule (batch <= tile). Step 1: a warp per output row (``warps`` rows a block on threadIdx.y; a staged x serves
them all; a loop of row groups per block, to share it further, made TVM's cross-thread reduction refuse). Step 2:
lanes stride the fan-in ``vec`` positions at a time; w and idx of those positions come in one vector load each
(16 bytes for fp16 values and int16 indices at vec 8), cached in registers. Step 3: per position, the lane gathers xs[idx, 0:tile] from shared
memory and accumulates ``tile`` float32 partial sums (rfactor over the lanes). Step 4: a warp-shuffle all-reduce
per batch column; lane 0 adds the bias and writes. ``stage=False`` (tile 1 only) gathers x through L1 instead of
staging it: for a batch of one, x is small and staging it costs a block as much as its rows' weights.

Col rule (x as [n_in, B]). Threads along the batch (coalesced), ``rows`` output rows per thread accumulated in
registers, w and idx warp-uniform (broadcast), the fan-in unrolled by ``unroll``.

Example:
    >>> func = decode_func(768, 3072, 312, "int16", "float16", tile=8)     # doctest: +SKIP
    >>> sch = DecodeRule().apply(func, DecodeParams())                     # doctest: +SKIP
"""

from __future__ import annotations

from ..runtime.cuda_params import ColParams, DecodeParams
from ._tvm_compat import import_tvm

__all__ = ["DecodeParams", "ColParams", "DecodeRule", "ColRule", "STAGE_BUDGET", "DTYPE_BYTES",
           "expand_rows", "decode_fits"]

# Staged x per block: what every arch of a default fatbin can give a block (sm_90 227 KB, sm_80 163 KB, sm_86 /
# sm_89 99 KB) and two blocks an SM on sm_80 / sm_90.
STAGE_BUDGET = 96 * 1024
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
EXPAND_SHARED_BYTES = 48 * 1024  # the expand kernel's zeroed rows: static shared memory limit


def decode_fits(n_in: int, tile: int, dtype: str, params: DecodeParams) -> bool:
    return not params.stage or n_in * tile * DTYPE_BYTES[dtype] <= STAGE_BUDGET


def expand_rows(n_in: int, dtype: str) -> int:
    """Rows the expand kernel zeroes and fills per block (its shared-memory tile: at most 48 KiB)."""
    return max(1, min(16, EXPAND_SHARED_BYTES // (n_in * DTYPE_BYTES[dtype])))


def _attr(func, name: str, default=None):
    attrs = func.attrs
    return attrs[name] if attrs is not None and name in attrs else default


def _layout(func) -> str:
    return str(_attr(func, "srigl.layout", ""))


class DecodeRule:
    """Small batches: a warp per row, vector loads of the weights, x staged in shared memory (module docstring)."""

    name = "decode"
    params_type = DecodeParams

    def default(self, tile: int) -> DecodeParams:
        # Unmeasured choices (GPU timing records replace them): tile 1 gathers through L1 (staging x would cost a
        # block as much as its rows' weights); wider tiles stage it once for 16 warps' rows.
        return DecodeParams(warps=8, stage=False) if tile == 1 else DecodeParams()

    def space(self, tile: int) -> list[DecodeParams]:
        grid = [DecodeParams(w, v, st) for w in (4, 8, 16, 32) for v in (4, 8) for st in (True, False)]
        return [p for p in grid if p.stage or tile == 1]

    def apply(self, func, params: DecodeParams | None = None):
        if _layout(func) != "decode":
            return None
        tile = int(_attr(func, "srigl.tile"))
        params = params or self.default(tile)
        n_in, dtype = int(func.params[0].shape[1]), str(func.params[0].dtype)
        if not isinstance(params, DecodeParams) or (not params.stage and tile != 1) or \
                not decode_fits(n_in, tile, dtype, params):
            return None
        try:
            return self._schedule(func, params, tile)
        except Exception:  # TVM's schedule errors: this variant does not apply to the shape
            return None

    @staticmethod
    def _schedule(func, params: DecodeParams, tile: int):
        sch = import_tvm().s_tir.Schedule(func)
        xs, acc, y = sch.get_sblock("xs"), sch.get_sblock("acc"), sch.get_sblock("y")
        *batch, rows, red = sch.get_loops(acc)  # (one column: no batch loop)
        block, warp = sch.split(rows, [None, params.warps])
        red_outer, lane, vec = sch.split(red, [None, 32, params.vec])
        # rfactor over the lanes: a lane's gather feeds all columns before the per-column all-reduce
        sch.reorder(block, warp, lane, red_outer, vec, *batch)
        partial = sch.rfactor(lane, 0)
        block, warp, lane, red_outer, vec, *batch = sch.get_loops(partial)
        sch.bind(block, "blockIdx.x")
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.set_scope(partial, 0, "local")
        for operand in (0, 2):  # w and idx of a lane's vec positions: one vector load each
            cached = sch.cache_read(partial, operand, "local")
            sch.compute_at(cached, red_outer)
            sch.vectorize(sch.get_loops(cached)[-1])
        for loop in (vec, *batch):
            sch.unroll(loop)
        sch.decompose_reduction(partial, red_outer)
        # The all-reduce over the lanes (TVM emits warp shuffles). Unit loops kept here would stop TVM from
        # keeping the partial sums in registers (they went to a [32 x tile] local array).
        sch.reverse_compute_at(acc, warp)
        inner = sch.get_loops(acc)[2:]  # (lanes) for one column, (lanes, columns) for more
        if len(inner) == 2:
            sch.reorder(inner[1], inner[0])  # the reduced loop innermost, as the cross-thread reduction requires
        sch.bind(inner[0], "threadIdx.x")
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(y, warp)
        if params.stage:
            sch.compute_at(xs, block, preserve_unit_loops=True)
            sch.set_scope(xs, 0, "shared.dyn")
            fused = sch.fuse(*sch.get_loops(xs)[-2:])
            _, ty, tx = sch.split(fused, [None, params.warps, 32])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
        else:
            sch.compute_inline(xs)
        return sch


class ColRule:
    """Medium and large batches on CUDA cores, x as [n_in, B] (module docstring)."""

    name = "col"
    params_type = ColParams

    def default(self) -> ColParams:
        # A row a thread, for occupancy: 4 rows x 128 threads gave 192 x (B / 128) blocks, about a fifth of the
        # H200's thread slots at batch 256 (GPU.md). Unmeasured: records replace it.
        return ColParams()

    def space(self) -> list[ColParams]:
        return [ColParams(t, r, u) for t in (32, 64, 128) for r in (1, 2, 4) for u in (4, 8)]

    def apply(self, func, params: ColParams | None = None):
        if _layout(func) != "col":
            return None
        params = params or self.default()
        if not isinstance(params, ColParams):
            return None
        sch = import_tvm().s_tir.Schedule(func)
        acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
        rows, batch, red = sch.get_loops(acc)
        row_block, row = sch.split(rows, [None, params.rows])
        batch_block, lane = sch.split(batch, [None, params.threads])
        red_outer, red_inner = sch.split(red, [None, params.unroll])
        sch.reorder(row_block, batch_block, lane, red_outer, red_inner, row)
        sch.bind(row_block, "blockIdx.y")
        sch.bind(batch_block, "blockIdx.x")
        sch.bind(lane, "threadIdx.x")
        sch.unroll(red_inner)
        sch.unroll(row)
        sch.set_scope(acc, 0, "local")
        sch.decompose_reduction(acc, red_outer)
        sch.reverse_compute_at(out, lane)
        return sch
