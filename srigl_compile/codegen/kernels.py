"""TE definitions of the condensed constant-fan-in kernel in its two layouts.

    row layout (small batch):  y[b, o]     = bias[o] + sum_r w[o, r] * x[b, idx[o, r]]          x [B, n_in]
    col layout (large batch):  yt[o, n, l] = bias[o] + sum_r w[o, r] * xt[idx[o, r], n, l]      xt [n_in, NB, L]

The batch is symbolic (B, or NB blocks of L lanes), so one compiled kernel serves every batch size. The bias is a
block of its own: ``te.sum(..., init=bias)`` is silently dropped by ``create_prim_func`` in TVM 0.27.
"""

from __future__ import annotations

from ._tvm import tvm_modules

__all__ = ["row_kernel", "col_kernel", "ROW_SYMBOL", "COL_SYMBOL"]

ROW_SYMBOL = "srigl_condensed_row"
COL_SYMBOL = "srigl_condensed_col"


def _operands(te, n_out: int, k: int, index_dtype: str):
    w = te.placeholder((n_out, k), "float32", name="w")
    idx = te.placeholder((n_out, k), index_dtype, name="idx")
    bias = te.placeholder((n_out,), "float32", name="bias")
    return w, idx, bias


def row_kernel(n_out: int, n_in: int, k: int, index_dtype: str):
    tvm, te, _ = tvm_modules()
    batch = te.var("B", "int64")
    x = te.placeholder((batch, n_in), "float32", name="x")
    w, idx, bias = _operands(te, n_out, k, index_dtype)
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((batch, n_out), lambda b, o: te.sum(w[o, r] * x[b, idx[o, r].astype("int64")], axis=r),
                     name="acc")
    y = te.compute((batch, n_out), lambda b, o: acc[b, o] + bias[o], name="y")
    func = te.create_prim_func([x, w, idx, bias, y])
    return func.with_attr("global_symbol", ROW_SYMBOL).with_attr("srigl.layout", "row")


def col_kernel(n_out: int, n_in: int, k: int, index_dtype: str, lanes: int):
    tvm, te, _ = tvm_modules()
    blocks = te.var("NB", "int64")
    xt = te.placeholder((n_in, blocks, lanes), "float32", name="xt")
    w, idx, bias = _operands(te, n_out, k, index_dtype)
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((n_out, blocks, lanes),
                     lambda o, n, lane: te.sum(w[o, r] * xt[idx[o, r].astype("int64"), n, lane], axis=r), name="acc")
    y = te.compute((n_out, blocks, lanes), lambda o, n, lane: acc[o, n, lane] + bias[o], name="y")
    func = te.create_prim_func([xt, w, idx, bias, y])
    return func.with_attr("global_symbol", COL_SYMBOL).with_attr("srigl.layout", "col")
