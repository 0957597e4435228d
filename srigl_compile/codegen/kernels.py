"""TE definitions of the condensed constant-fan-in linear op in its two layouts.

    row layout (small batch):  y[b, o]     = bias[o] + sum_r w[o, r] * x[b, idx[o, r]]        x  [B, n_in]
                               idx is read as 64-bit words (``index_words``): 4 int16 or 2 int32 indices each
    col layout (large batch):  y[t, l, o]  = bias[o] + sum_r w[o, r] * xt[t, idx[o, r], l]    xt [NT, n_in, lanes]
                               y [NT, lanes, n_out] is y [B, n_out]; ``pack_kernel`` makes xt from x [B, n_in];
                               w and idx blocked by rows and k-tiles, in the order a task reads them
                               (or, fused_pack, x [B, n_in] with the packing as a block of the kernel)
    offset layout (direct conv):  y[b, o, t, l] = bias[o] + sum_r w[o, r] * x[b, off[o, r] + t * lanes + l]
                               (w and off blocked by rows and k-tiles, in the order the kernel reads them)
                               x [B, L]: one zero-padded image per row, flattened [C, Hx, Wp]; off[o, r] is where
                               the r-th input (channel, kernel row, kernel column) of output o starts in it, so the
                               output positions q = t * lanes + l run over the padded grid [OH, Wp] (see
                               ``runtime.conv_op``): each non-zero reads ``lanes`` contiguous floats, no im2col copy

``w``, ``idx`` and ``bias`` are runtime arguments, so one compiled kernel serves every layer of a shape. The batch
is symbolic (``B``, or ``NT`` tiles of ``lanes`` columns: the caller pads the batch to a multiple of ``lanes``).

Why the blocks look like this:
- the bias is a block of its own: ``te.sum(..., init=bias)`` is silently dropped by ``create_prim_func`` (TVM 0.27);
  without a bias the reduction writes the output directly;
- the row layout gathers x into ``xg`` first: scheduled per k-tile into a small stack buffer, the gathers become
  scalar loads inserted into one vector (AVX2 has no fast gather), while the multiply-add stays vectorised;
- the row layout takes its indices as 64-bit words and shifts them out: a gather is load-port bound, and one word
  load for 4 int16 indices instead of 4 index loads made the batch-1 kernel 10-15% faster on Zen 3 (40 -> 35 us
  for 3072 -> 768 at 90%); the caller passes ``indices.view(torch.int64)``, no copy;
- every function carries ``srigl.layout`` (what the rules check) and its own ``global_symbol``.

Example:
    >>> func = row_kernel(768, 3072, 312, "int16", has_bias=False)      # doctest: +SKIP
    >>> str(func.attrs["srigl.layout"])                                 # doctest: +SKIP
    'row'
"""

from __future__ import annotations

from ._tvm_compat import import_tvm

__all__ = ["row_kernel", "col_kernel", "pack_kernel", "offset_kernel", "index_words",
           "fused_pack_supported", "ROW_SYMBOL", "COL_SYMBOL", "INDEX_DTYPES"]

ROW_SYMBOL = "srigl_condensed_row"
COL_SYMBOL = "srigl_condensed_col"
INDEX_DTYPES = ("int16", "int32")
_INDEX_BITS = {"int16": 16, "int32": 32}


def index_words(index_dtype: str) -> int:
    """Indices per 64-bit word of the row kernel's index operand (4 int16, 2 int32)."""
    return 64 // _INDEX_BITS[index_dtype]


def _check(n_out: int, n_in: int, k: int, index_dtype: str) -> None:
    if min(n_out, n_in, k) < 1:
        raise ValueError(f"n_out, n_in and k must be >= 1, got {n_out}, {n_in}, {k}")
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    if index_dtype == "int16" and n_in > 2**15:
        raise ValueError(f"int16 indices cannot address {n_in} inputs; use int32")


def _operands(te, n_out: int, k: int, index_dtype: str, value_dtype: str = "float32"):
    w = te.placeholder((n_out, k), value_dtype, name="w")
    idx = te.placeholder((n_out, k), index_dtype, name="idx")
    return w, idx


def _f32(value):
    """A value operand read as float32 (bfloat16 values widen exactly; the sums stay float32)."""
    return value if value.dtype == "float32" else value.astype("float32")


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (+-1 beyond, to float32 precision): Eigen's float erf rational
# approximation (also TVM's topi.fast_erf), here as an expression so it fuses into a kernel's write-back. TVM's
# own erf on llvm is a scalar libm call per element; this is mul / add / one divide, vectorised with the tile.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(te, value):
    x = te.min(te.max(value, te.const(-4.0, "float32")), te.const(4.0, "float32"))
    x2 = x * x
    p, q = te.const(_ERF_P[0], "float32"), te.const(_ERF_Q[0], "float32")
    for c in _ERF_P[1:]:
        p = p * x2 + te.const(c, "float32")
    for c in _ERF_Q[1:]:
        q = q * x2 + te.const(c, "float32")
    return x * p / q


# exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r keeps its low bits), e^r by
# Cephes' expf polynomial on |r| <= ln 2 / 2 (float32 to ~1 ulp), 2^n written into the exponent bits. The clamp
# keeps 2^n a normal float. Like _erf: TVM's exp on llvm is a libm call per element, this vectorises.
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LN2_HIGH, _LN2_LOW = 0.693359375, -2.12194440e-4


def _exp(te, value):
    tirx = import_tvm().tirx
    x = te.min(te.max(value, te.const(-87.3, "float32")), te.const(88.3, "float32"))
    n = te.floor(x * te.const(1.4426950408889634, "float32") + te.const(0.5, "float32"))
    r = x - n * te.const(_LN2_HIGH, "float32") - n * te.const(_LN2_LOW, "float32")
    p = te.const(_EXP_P[0], "float32")
    for c in _EXP_P[1:]:
        p = p * r + te.const(c, "float32")
    e_r = p * r * r + r + te.const(1.0, "float32")
    two_to_n = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return e_r * two_to_n


def _activation(te, value, epilogue: str):
    """The epilogue's activation on ``value``: ReLU, GELU (exact form, 0.5 x (1 + erf(x / sqrt 2))) or SiLU
    (x sigmoid(x) = x / (1 + e^-x))."""
    if "relu" in epilogue:  # (not te.max: LLVM's maxnum returns 0 for NaN, torch.relu returns NaN)
        return te.if_then_else(value < te.const(0.0, "float32"), te.const(0.0, "float32"), value)
    if "gelu" in epilogue:
        return te.const(0.5, "float32") * value * (
            te.const(1.0, "float32") + _erf(te, value * te.const(0.7071067811865476, "float32")))
    if "silu" in epilogue:
        return value / (te.const(1.0, "float32") + _exp(te, -value))
    return value


def _finish(te, acc, bias_shape_n: int, has_bias: bool, inputs: list, out_fn, epilogue: str = ""):
    """Add the write-back block y = act(acc + bias + res) (bias, residual and activation where asked; no block
    when none is; ``res`` in acc's layout) and build the PrimFunc's argument list."""
    if not has_bias and not epilogue:
        return inputs + [acc]
    bias = te.placeholder((bias_shape_n,), "float32", name="bias")
    res = te.placeholder(acc.shape, "float32", name="res")

    def out(*i):
        value = acc(*i) + bias[out_fn(*i)] if has_bias else acc(*i)
        return _activation(te, value + res(*i) if "add" in epilogue else value, epilogue)

    y = te.compute(acc.shape, out, name="y")
    return inputs + ([bias] if has_bias else []) + ([res] if "add" in epilogue else []) + [y]


def row_kernel(n_out: int, n_in: int, k: int, index_dtype: str, has_bias: bool = True, symbol: str = ROW_SYMBOL,
               bit_extract: bool = False, epilogue: str = "", value_dtype: str = "float32"):
    """PrimFunc ``f(x[B, n_in], w[n_out, k], idx[n_out, k / per] int64, (bias[n_out],) (res[B, n_out],) y[B, n_out])``
    (res with an "add" epilogue), where idx is
    the [n_out, k] ``index_dtype`` indices read as 64-bit words (``per = index_words(index_dtype)``; the first index
    in the low bits, as a little-endian ``view`` gives them).

    ``bit_extract`` (x86 with BMI1 only, ``cpu_target.has_bit_extract``): take each index out of its word with one
    ``bextr`` rather than the shift + zero-extend (+ copy) LLVM emits. The kernel is bound by instruction issue at
    batch 1, and this drops about a quarter of its instructions per non-zero.

    Raises:
        ValueError: a size < 1, an unknown index dtype, or k not a multiple of ``per``.
    """
    _check(n_out, n_in, k, index_dtype)
    per, bits = index_words(index_dtype), _INDEX_BITS[index_dtype]
    if k % per:
        raise ValueError(f"the row kernel reads {per} {index_dtype} indices per 64-bit word: k must be a multiple "
                         f"of {per}, got {k} (kernel handles pad k to a multiple of 8)")
    tvm = import_tvm()
    te, tirx = tvm.te, tvm.tirx
    batch = te.var("B", "int64")
    x = te.placeholder((batch, n_in), "float32", name="x")
    w = te.placeholder((n_out, k), value_dtype, name="w")
    words = te.placeholder((n_out, k // per), "int64", name="idx")

    def index(o, r):  # indices are < 2**15 (int16) or < 2**31 (int32): the masked field is the index itself
        shift = ((r % per) * bits).astype("int64")
        if bit_extract:  # control word: start bit | field length << 8 (constant once the gather is unrolled)
            return tirx.call_llvm_pure_intrin("int64", "llvm.x86.bmi.bextr.64", words[o, r // per],
                                              shift | (bits << 8)).astype("int32")
        return ((words[o, r // per] >> shift) & ((1 << bits) - 1)).astype("int32")

    xg = te.compute((batch, n_out, k), lambda b, o, r: x[b, index(o, r)], name="xg")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((batch, n_out), lambda b, o: te.sum(_f32(w[o, r]) * xg[b, o, r], axis=r), name="acc")
    args = _finish(te, acc, n_out, has_bias, [x, w, words], lambda b, o: o, epilogue)
    func = te.create_prim_func(args)
    return func.with_attr("global_symbol", symbol).with_attr("srigl.layout", "row")


def col_kernel(n_out: int, n_in: int, k: int, index_dtype: str, lanes: int = 64, has_bias: bool = True,
               symbol: str = COL_SYMBOL, block: tuple[int, int] = (32, 8), fused_pack: bool = False,
               epilogue: str = "", value_dtype: str = "float32"):
    """PrimFunc ``f(xt, w, idx, (bias,) (res,) y)``: batch columns in tiles of ``lanes``; res (with an "add" epilogue)
    is the layer's residual [M, n_out].

    ``block`` = (rows, k_tile): xt [NT, n_in, lanes] (from ``pack_kernel``; each
    tile contiguous, so no 4 KiB-stride cache aliasing at large batch) and y [NT, lanes, n_out], i.e. y is already
    [B, n_out]: the kernel writes its accumulators back transposed, one store per output against k multiply-adds.
    w and idx are [ceil(n_out / rows), k / k_tile, rows, k_tile] (``runtime.spec.block_rows``): a task's rows,
    k-tile by k-tile, in the order it reads them. Row-major [n_out, k] made a task read ``rows`` strided streams
    per operand at once, which the prefetchers could not follow once the weights were out of cache (a whole model's
    are): ViT-B/16 at batch 1, 197 rows, 84.8 -> 78.2 ms a forward.

    ``fused_pack``: ``f(x [M, n_in], w, idx, (bias,) y [NT, lanes, n_out])``; the tiles are a
    block of the kernel (``pack_kernel``'s expression), so a schedule can pack each tile inside the task that
    uses it instead of writing all of them out and reading them back.
    """
    _check(n_out, n_in, k, index_dtype)
    te = import_tvm().te
    tiles = te.var("NT", "int64")
    if fused_pack and not fused_pack_supported(n_in, index_dtype):
        raise ValueError(f"fused_pack needs fused_pack_supported({n_in}, {index_dtype!r})")
    rows, k_tile = block
    if min(rows, k_tile) < 1 or k % k_tile:
        raise ValueError(f"block (rows, k_tile) must be >= 1 with k_tile dividing k = {k}, got {block}")
    blocks = -(-n_out // rows)
    w = te.placeholder((blocks, k // k_tile, rows, k_tile), value_dtype, name="w")
    idx = te.placeholder((blocks, k // k_tile, rows, k_tile), index_dtype, name="idx")
    ko, ki = te.reduce_axis((0, k // k_tile), name="ko"), te.reduce_axis((0, k_tile), name="ki")
    if fused_pack:
        x = te.placeholder((te.var("M", "int64"), n_in), "float32", name="x")
        xt = te.compute((tiles, n_in, lanes), _tile_of(te, x, lanes), name="xt")
    else:
        xt = te.placeholder((tiles, n_in, lanes), "float32", name="xt")

    def column(c, o):  # fused: clamped, so that TVM can bound the tile a task reads (pack checks indices anyway)
        i = idx[c, ko, o, ki].astype("int32")
        return te.min(te.max(i, 0), n_in - 1) if fused_pack else i

    acc = te.compute((tiles, blocks, rows, lanes), lambda t, c, o, lane: te.sum(
        _f32(w[c, ko, o, ki]) * xt[t, column(c, o), lane], axis=[ko, ki]), name="acc")
    bias = te.placeholder((n_out,), "float32", name="bias")
    # the residual is the layer's [M, n_out]: the padding rows past M (written, never returned) read its last row
    m_rows = x.shape[0] if fused_pack else te.var("M", "int64")
    res = te.placeholder((m_rows, n_out), "float32", name="res")

    def out(t, lane, o):
        value = acc[t, o // rows, o % rows, lane]
        value = value + bias[o] if has_bias else value
        value = value + res[te.min(t * lanes + lane, m_rows - 1), o] if "add" in epilogue else value
        return _activation(te, value, epilogue)

    y = te.compute((tiles, lanes, n_out), out, name="y")
    first = x if fused_pack else xt
    args = [first, w, idx] + ([bias] if has_bias else []) + ([res] if "add" in epilogue else []) + [y]
    func = te.create_prim_func(args).with_attr("srigl.fused_pack", int(fused_pack))
    return func.with_attr("global_symbol", symbol).with_attr("srigl.layout", "col")


def fused_pack_supported(n_in: int, index_dtype: str) -> bool:
    """Whether ``col_kernel(fused_pack=True)`` can be scheduled: TVM bounds the tile a task reads through the
    clamp ``min(max(index, 0), n_in - 1)``, and drops the clamp (then fails) when the index dtype cannot exceed
    n_in - 1 anyway (int16 indices into 32768 inputs)."""
    return n_in - 1 < 2 ** (_INDEX_BITS[index_dtype] - 1) - 1


def _tile_of(te, x, lanes: int):
    """xt[t, i, lane] = x[t * lanes + lane, i], zero for rows past x's end."""
    rows = x.shape[0]
    return lambda t, i, lane: te.if_then_else(t * lanes + lane < rows, x[te.min(t * lanes + lane, rows - 1), i],
                                              te.const(0.0, "float32"))


def pack_kernel(n_in: int, lanes: int, symbol: str):
    """PrimFunc ``f(x[M, n_in], xt[NT, n_in, lanes])``: the col kernel's input tiles, rows >= M zero-filled.

    torch's permuted copies run at a few GB/s on this layout; this runs near memory speed.
    """
    te = import_tvm().te
    x = te.placeholder((te.var("M", "int64"), n_in), "float32", name="x")
    xt = te.compute((te.var("NT", "int64"), n_in, lanes), _tile_of(te, x, lanes), name="xt")
    func = te.create_prim_func([x, xt])
    return func.with_attr("global_symbol", symbol).with_attr("srigl.layout", "pack")


def offset_kernel(n_out: int, k: int, lanes: int, has_bias: bool, symbol: str, block_rows: int = 32,
                  k_tile: int = 8, epilogue: str = "", value_dtype: str = "float32", share: int = 1):
    """PrimFunc ``f(x[B, L], w[NB, k / k_tile, block_rows, k_tile], off[NB, k / k_tile, block_rows / share, k_tile]
    int32, (bias[n_out],) (res[B, n_out, NT, lanes],) y[B, n_out, NT, lanes])``: a stride-1 convolution read
    straight from the padded input; the caller guarantees ``off + NT * lanes <= L``. ``epilogue`` ("relu", "add",
    "add_relu", "gelu", "silu") is computed in the write-back block: y = act(acc + bias + res), with ``res`` in y's
    layout (the output grid).

    w and off are [n_out, k] blocked in the order a task reads them (``runtime.spec.block_rows``): row block c holds
    rows c * block_rows ... (zero rows pad the last block), k-tile by k-tile. Row-major [n_out, k] made a task read
    ``block_rows`` strided streams per operand at once, which the prefetchers could not follow and which aliased in
    L1 (1.1-2x slower, hot or cold). Every size but n_out and k is a runtime argument, so one kernel serves a layer
    at any image size.

    ``share`` > 1: ``share`` consecutive rows read one offset list (their union, ``runtime.spec.shared_columns``;
    zero weights where a row lacks an input), so a schedule that unrolls them loads each input vector once for all
    of them (near-dense layers, where the union is barely longer than k). Its length differs per layer, so then k
    is a runtime argument too (the ``k`` given is ignored).
    """
    if min(n_out, k, lanes, block_rows, k_tile, share) < 1 or k % k_tile or block_rows % share:
        raise ValueError(f"n_out, k, lanes, block_rows, k_tile and share must be >= 1, k_tile must divide k and share "
                         f"block_rows, got {n_out}, {k}, {lanes}, {block_rows}, {k_tile}, {share}")
    te = import_tvm().te
    batch, length, tiles = te.var("B", "int64"), te.var("L", "int64"), te.var("NT", "int64")
    k_tiles = te.var("KT", "int64") if share > 1 else k // k_tile
    blocks = -(-n_out // block_rows)
    x = te.placeholder((batch, length), "float32", name="x")
    w = te.placeholder((blocks, k_tiles, block_rows, k_tile), value_dtype, name="w")
    off = te.placeholder((blocks, k_tiles, block_rows // share, k_tile), "int32", name="idx")
    ko, ki = te.reduce_axis((0, k_tiles), name="ko"), te.reduce_axis((0, k_tile), name="ki")
    acc = te.compute((batch, tiles, blocks, block_rows, lanes), lambda b, t, c, o, lane: te.sum(
        _f32(w[c, ko, o, ki]) * x[b, off[c, ko, o // share, ki].astype("int64") + t * lanes + lane], axis=[ko, ki]),
        name="acc")
    # y is always a block of its own: the write-back from the task's [rows, lanes] accumulators to [B, n_out, ...]
    bias = te.placeholder((n_out,), "float32", name="bias")
    res = te.placeholder((batch, n_out, tiles, lanes), "float32", name="res")

    def out(b, o, t, lane):
        value = acc[b, t, o // block_rows, o % block_rows, lane] + (bias[o] if has_bias else 0.0)
        value = value + res[b, o, t, lane] if "add" in epilogue else value
        return _activation(te, value, epilogue)

    y = te.compute((batch, n_out, tiles, lanes), out, name="y")
    args = [x, w, off] + ([bias] if has_bias else []) + ([res] if "add" in epilogue else []) + [y]
    func = te.create_prim_func(args)
    return func.with_attr("global_symbol", symbol).with_attr("srigl.layout", "offset")
