"""CPU schedule rules for the condensed kernels: ``apply(func, target, params) -> Schedule | None``.

A rule declines (returns None) when the function is not its layout, the target is not llvm, or the variant does
not fit the shape (a vector width that does not divide k). Each rule offers a small ``space(k)`` of variants and a
``default(k, target)`` that works for every k (the row and col k-inner widths fall back to a divisor of k: 8, 4,
2 or 1; the col row chunk is 64 on AVX-512 targets, else 32).

Row rule (small batch, TVM.md "batch 1"). Step 1: parallel over chunks of output rows, batch inside each row so a
row's weights are read once for all batch rows. Step 2: split k into (ko, ki = vec) and rfactor ki: vec partial sums
form one vector register. Step 3: gather x[idx] for one k-tile into a stack buffer (scalar loads inserted into a
vector: Zen 3's vgatherdps is slower than that; the indices come from 64-bit word loads and shifts, see
``kernels``), vectorise the multiply-add. Step 4: fold the horizontal sum and
the bias into the row loop.

Col rule (large batch, TVM.md "large batch"; x as [NT, in, lanes]). Step 1: parallel
over (batch tile x row chunk). Step 2: k outermost inside a task: rows' indices are sorted, so at one k-tile all rows
of the chunk read a narrow band of x that stays in L1/L2. Step 3: per row, an unrolled k-inner tile of ``kin``
broadcast-FMAs on the ``lanes`` batch columns (lanes / 8 ymm accumulators kept in registers); ``rin`` rows
interleaved for more independent accumulators. Step 4: write the chunk back (transposed to [B, n_out]) with the
bias. The operands are stored chunk by chunk, k-tile by k-tile, so the row chunk and k-inner tile are fixed when
the kernel is defined (a variant that differs is declined). Fused variant
(the kernel has an "xt" block): one task per tile, which first packs its tile into a local buffer, then runs its
row chunks one after another.

Pack rule: x [B, in] -> [NT, in, lanes] tiles for the col kernel (a blocked transpose; see PackRule).

Offset rule (direct convolution, x as padded images [B, C * Hx * Wp]): the col rule's loop nest with (image x
position tile x row block) as the parallel tasks, on weights and offsets stored block by block in that order; a
non-zero's ``lanes`` inputs are contiguous, so each broadcast-FMA reads one unaligned vector and the input needs
no layout change. Rows sharing offset lists run row group by row group instead, each over its whole k with its
accumulators in registers (``_row_stationary``).

Example:
    >>> sch = RowRule().apply(row_kernel(768, 3072, 312, "int16"), {"kind": "llvm"}, RowParams())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..runtime.cpu_features import cpu_features
from ..runtime.llvm_params import ColParams, RowParams
from ._tvm_compat import import_tvm

__all__ = ["RowParams", "ColParams", "RowRule", "ColRule", "PackRule", "OffsetRule", "RULES", "schedule", "layout_of",
           "offset_share"]


def layout_of(func) -> str:
    """The ``srigl.layout`` attribute of a PrimFunc ("" when absent)."""
    attrs = func.attrs
    return str(attrs["srigl.layout"]) if attrs is not None and "srigl.layout" in attrs else ""


def _fan_in(func) -> int:
    """k of a kernel from its weights (TVM 0.27: func.params are the buffers, w the 2nd): [n_out, k], or blocked
    [blocks, k / k_tile, rows, k_tile]."""
    shape = func.params[1].shape
    return int(shape[1]) * (int(shape[3]) if len(shape) == 4 else 1)


def _largest_divisor(k: int, options=(8, 4, 2, 1)) -> int:
    return next(v for v in options if k % v == 0)


def _is_llvm(target) -> bool:
    if target is None:
        return True
    kind = target.get("kind") if isinstance(target, Mapping) else getattr(getattr(target, "kind", None), "name", None)
    return kind == "llvm"


def _has_avx512(target) -> bool:
    """Whether ``target`` is an llvm target dict whose CPU has AVX-512 (16-lane float vectors, 32 registers)."""
    return isinstance(target, Mapping) and _is_llvm(target) and "avx512f" in cpu_features(target)


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # TVM raises ScheduleError (a TVMError subclass) for an unknown block
        return False
    return True


class RowRule:
    """GEMV-like rule for the row layout (x [B, n_in]); see the module docstring."""

    name = "row"
    params_type = RowParams

    def default(self, k: int, target=None) -> RowParams:
        return RowParams(vec=_largest_divisor(k))

    def space(self, k: int) -> list[RowParams]:
        grid = [RowParams(v, c, u) for v in (8, 16) for c in (16, 32, 64) for u in (4, 16)]
        return [p for p in grid if k % p.vec == 0] or [self.default(k)]

    def apply(self, func, target=None, params: RowParams | None = None):
        if layout_of(func) != "row" or not _is_llvm(target):
            return None
        params = params or self.default(_fan_in(func))
        if not isinstance(params, RowParams) or _fan_in(func) % params.vec:
            return None
        sch = import_tvm().s_tir.Schedule(func)
        has_bias = _has_block(sch, "y")
        gather, acc = sch.get_sblock("xg"), sch.get_sblock("acc")
        batch, rows, red = sch.get_loops(acc)
        row_chunk, row = sch.split(rows, [None, params.chunk])
        red_outer, red_inner = sch.split(red, [None, params.vec])
        sch.reorder(row_chunk, row, batch, red_outer, red_inner)
        partial = sch.rfactor(red_inner, 0)
        loops = sch.get_loops(partial)  # row_chunk, row, batch, red_outer, red_inner
        sch.parallel(loops[0])
        sch.compute_at(gather, loops[3])  # global scope: a <1 KiB stack buffer that LLVM keeps in registers
        sch.unroll(sch.get_loops(gather)[-1])
        sch.vectorize(loops[4])
        sch.annotate(loops[3], "pragma_auto_unroll_max_step", params.unroll)
        sch.annotate(loops[3], "pragma_unroll_explicit", 1)
        sch.reverse_compute_at(acc, loops[2])
        if has_bias:
            sch.reverse_compute_at(sch.get_sblock("y"), loops[2])
        sch.decompose_reduction(partial, loops[3])
        return sch


def _col_space(k: int, row_chunks: tuple[int, ...]) -> list[ColParams]:
    """Row chunks x k-inner tiles (dividing k) x rows interleaved x lanes."""
    return [ColParams(r, i, n, lanes) for r in row_chunks for i in (4, 8) for n in (1, 2) for lanes in (32, 64)
            if k % i == 0]


def _broadcast_fma_nest(sch, tasks: tuple, red_outer, rows, red_inner, lanes, rin: int, inside: tuple = ()):
    """The col rule's loop nest: parallel ``tasks`` (fused); inside them (after ``inside``), k-tiles outermost,
    then rows, an unrolled k-inner tile and ``rin`` unrolled rows of broadcast-FMAs on the vectorised lanes.
    Returns the task loop."""
    row_outer, row_inner = sch.split(rows, [None, rin])
    sch.reorder(*tasks, *inside, red_outer, row_outer, red_inner, row_inner, lanes)
    work = sch.fuse(*tasks) if len(tasks) > 1 else tasks[0]
    sch.parallel(work)
    sch.vectorize(lanes)
    sch.unroll(red_inner)
    sch.unroll(row_inner)
    return work


# Output rows per col-kernel task on AVX-512 CPUs: a task reads its batch tile once for 64 rows instead of 32.
# Xeon (AVX-512), 2 threads, 90% sparse, one call: 197 rows 1.10-1.20x for 768-input layers (2304x768 721 ->
# 630 us), 1.00x for 768x3072; 12608 rows 1.07-1.40x; 128 rows 2-4% slower than 64. (Elsewhere: 32, as tuned on
# Zen 3 with AVX2.)
AVX512_COL_ROWS = 64


class ColRule:
    """Large-batch rule for the col layout (xt [NT, n_in, lanes]); see the module docstring."""

    name = "col"
    params_type = ColParams

    def default(self, k: int, target=None) -> ColParams:
        return ColParams(rows=AVX512_COL_ROWS if _has_avx512(target) else 32, kin=_largest_divisor(k))

    def space(self, k: int) -> list[ColParams]:
        return _col_space(k, (32, 64)) or [self.default(k)]

    def apply(self, func, target=None, params: ColParams | None = None):
        """The operands are [blocks, k / kin, rows, kin] (``kernels.col_kernel``): rows and kin are fixed when the
        kernel is defined, so a variant that differs is declined; the tasks are (tile x row block), or with the
        fused pack one a tile."""
        if layout_of(func) != "col" or not _is_llvm(target):
            return None
        params = params or self.default(_fan_in(func), target)
        w_shape = func.params[1].shape  # (TVM 0.27: func.params are the buffers)
        if not isinstance(params, ColParams) or params.rows % params.rin or (
                int(w_shape[2]), int(w_shape[3]), int(func.params[-1].shape[1])) != (params.rows, params.kin,
                                                                                       params.lanes):
            return None
        sch = import_tvm().s_tir.Schedule(func)
        acc = sch.get_sblock("acc")
        fused_pack = _has_block(sch, "xt")
        tile, block, rows, lanes, red_outer, red_inner = sch.get_loops(acc)
        work = _broadcast_fma_nest(sch, (tile,) if fused_pack else (tile, block), red_outer, rows, red_inner, lanes,
                                   params.rin, inside=(block,) if fused_pack else ())
        # the transposed write-back of a row block; its innermost loop is a row block that may be predicated
        sch.reverse_compute_at(sch.get_sblock("y"), block if fused_pack else work)
        sch.decompose_reduction(acc, red_outer)
        if fused_pack:  # each task packs its own tile [n_in, lanes] into a local buffer first
            pack = sch.get_sblock("xt")
            sch.compute_at(pack, work)
            _pack_lanes_as_vectors(sch, pack, target)
        return sch


def _pack_lanes_as_vectors(sch, pack, target):
    """The innermost (feature, lane) loops of a pack block, in blocks of 32 features: each vector store writes
    consecutive lanes of one feature, gathered from as many batch rows (the target's vector width: 16 with
    AVX-512, else 8); returns the loop over feature blocks. The older order read a row's features as a vector and
    wrote them with a stride of ``lanes``: one scalar store per element, 2.2-3.7x slower on the Xeon (192 x 768
    rows 54 -> 25 us, 192 x 3072 305 -> 112 us, 12608 x 768 8.66 -> 2.36 ms)."""
    feature, lane = sch.get_loops(pack)[-2:]
    widths = (16, 8, 4, 2, 1) if _has_avx512(target) else (8, 4, 2, 1)
    width = _largest_divisor(int(sch.get(lane).extent), widths)
    if not isinstance(sch.get(feature).extent, import_tvm().tirx.IntImm):  # (the tile loop: a pack of one input
        feature = sch.add_unit_loop(lane)                                  # feature inside a task lost its loop)
    chunk, inner = sch.split(feature, [None, _largest_divisor(int(sch.get(feature).extent), (32, 16, 8, 4, 2, 1))])
    lane_outer, lane_inner = sch.split(lane, [None, width])
    sch.reorder(chunk, lane_outer, inner, lane_inner)
    if width > 1:
        sch.vectorize(lane_inner)
    return chunk


class PackRule:
    """x [M, n_in] -> tiles [NT, n_in, lanes] for the col kernel: parallel over (tile x feature block); each
    feature's lanes are gathered from the batch rows and written as vectors."""

    name = "pack"
    params_type = type(None)

    def apply(self, func, target=None, params=None):
        if layout_of(func) != "pack" or not _is_llvm(target):
            return None
        sch = import_tvm().s_tir.Schedule(func)
        block = sch.get_sblock("xt")
        tile = sch.get_loops(block)[0]
        chunk = _pack_lanes_as_vectors(sch, block, target)
        sch.parallel(sch.fuse(tile, chunk))
        return sch


class OffsetRule:
    """Direct-convolution rule for the offset layout; see the module docstring. The kernel's operands are blocked
    by ``rows`` and ``kin`` (``kernels.offset_kernel``), so a variant only applies to the function built for it."""

    name = "offset"
    params_type = ColParams

    def default(self, k: int, target=None) -> ColParams:
        return ColParams(rows=32, kin=_largest_divisor(k), rin=2, lanes=64)

    def space(self, k: int) -> list[ColParams]:
        return _col_space(k, (16, 32)) or [self.default(k)]

    def apply(self, func, target=None, params: ColParams | None = None):
        if layout_of(func) != "offset" or not _is_llvm(target):
            return None
        w_shape, off_shape = func.params[1].shape, func.params[2].shape
        block_rows, k_tile = int(w_shape[2]), int(w_shape[3])
        if params is None:  # (a shared-offset kernel's k is a runtime size: it is built for its variant)
            params = self.default(int(w_shape[1]) * k_tile)
        if not isinstance(params, ColParams) or params.rows % params.rin or params.rin % params.share:
            return None  # the unrolled rows must hold whole groups of rows sharing offsets
        built = (block_rows, k_tile, int(func.params[-1].shape[-1]), block_rows // int(off_shape[2]))
        if built != (params.rows, params.kin, params.lanes, params.share):
            return None  # rows, kin, lanes and share are part of the kernel's definition (operand blocks, y's tiles)
        sch = import_tvm().s_tir.Schedule(func)
        acc = sch.get_sblock("acc")
        image, tile, block, rows, lanes, red_outer, red_inner = sch.get_loops(acc)
        n_out = int(func.params[-1].shape[1])  # (y [B, n_out, NT, lanes])
        nest = _row_stationary if params.share > 1 and n_out % block_rows == 0 else _k_tile_outer
        return nest(sch, acc, (image, tile, block), rows, lanes, red_outer, red_inner, params.rin)


def _k_tile_outer(sch, acc, tasks: tuple, rows, lanes, red_outer, red_inner, rin: int):
    """The offset kernel as the col rule's nest: inside a task, k-tiles outermost over all its rows (their
    accumulators in a workspace), then the write-back of the task's rows."""
    work = _broadcast_fma_nest(sch, tasks, red_outer, rows, red_inner, lanes, rin)
    out = sch.get_sblock("y")
    sch.reverse_compute_at(out, work)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.decompose_reduction(acc, red_outer)
    return sch


def _row_stationary(sch, acc, tasks: tuple, rows, lanes, red_outer, red_inner, rin: int):
    """The offset kernel with rows sharing offsets: inside a task, each group of ``rin`` rows runs its whole k
    with its rin x lanes accumulators in registers (a local buffer LLVM promotes), then writes its rows back.

    The k-tile-outer nest keeps a task's [rows, lanes] accumulators in a heap workspace, allocated, zeroed and
    reloaded per k-tile, which costs most where k is small. For shared offsets (one input vector per ``rin``
    rows: FMA-bound, not load-bound) this order measured on the Xeon, 2 threads, kernel alone, ResNet-50 shapes
    (``benchmarks/micro/offset_nests.py`` and a first script, three runs; k padded to 8): 256x64 k64 56x56
    1.42-1.46x (457 -> 320 us), 64x64 k64 1.21x, 256x64 k64 14x14 0.96-1.20x, 64x256 k248 0.96-1.07x; inside
    ResNet-50 at batch 1 those seven layers 4.23 -> 3.33 ms. Rows with their own offsets are load-bound, and there
    it measured 0.79-0.91x: they keep the other nest, as do layers whose last row block is ragged (TVM then keeps
    the write-back after all groups, and with it the task's whole [rows, lanes] accumulator)."""
    row_outer, row_inner = sch.split(rows, [None, rin])
    sch.reorder(*tasks, row_outer, red_outer, red_inner, row_inner, lanes)
    work = sch.fuse(*tasks)
    sch.parallel(work)
    sch.vectorize(lanes)
    sch.unroll(red_inner)
    sch.unroll(row_inner)
    out = sch.get_sblock("y")
    sch.reverse_compute_at(out, row_outer)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, red_outer)
    return sch


SHARE = 4  # rows per shared offset list (4 rows x 4 vectors of 16 lanes: 16 of the 32 zmm accumulators)
SHARE_UNION = 1.15  # largest expected union / k at which sharing pays: measured 1.3x at 1.0-1.05, 1.0x at ~1.6


def offset_share(n_in: int, k: int) -> int:
    """Rows sharing one offset list in a convolution's offset kernel: ``SHARE`` when ``SHARE`` rows of density
    d = k / n_in are expected to read hardly more inputs together than one alone (union n_in (1 - (1 - d)^SHARE)
    <= SHARE_UNION k: the near-dense layers that ERK leaves, e.g. ResNet-50's first-stage 1x1 convolutions at
    95%), else 1. ResNet-50 shapes, 2 cores, kernel alone: 256x64 at k 61 724 -> 540 us, 64x256 at k 245 606 ->
    460 us; at density 0.57 (union 1.7 k) no gain. (A strided convolution's n_in counts phase-image columns its
    filters never reach, so its density looks lower than it is and it keeps 1: a safe under-estimate.)"""
    density = min(k / n_in, 1.0)
    return SHARE if n_in * (1 - (1 - density) ** SHARE) <= SHARE_UNION * k else 1


RULES = {"row": RowRule(), "col": ColRule(), "pack": PackRule(), "offset": OffsetRule()}


def schedule(func, rules: list | None = None, params: Any = None, target=None):
    """The schedule of the first rule that accepts ``func`` (and ``params``, when given).

    Raises:
        ValueError: every rule declined (the message names the layout and the variant).
    """
    for rule in rules if rules is not None else list(RULES.values()):
        if params is not None and not isinstance(params, rule.params_type):
            continue
        sch = rule.apply(func, target, params)
        if sch is not None:
            return sch
    raise ValueError(f"no schedule rule accepts layout {layout_of(func)!r} (k={_fan_in(func)}) with {params}")
