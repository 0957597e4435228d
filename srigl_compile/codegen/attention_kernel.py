"""TIR of a lowered model's self-attention core, softmax(q k^T * scale) v per head, which CPU linear libraries carry
beside the layer norm (``runtime.spec.LINEAR_GLUE``; called by ``runtime.attention_op``).

    attention(q [B, T, Wq], k [B, S, Wk], v [B, S, Wv], kt [B, H, NC, D, 64], o [B, T, H * D], heads, q_off,
              k_off, v_off, scale)
        head h of a row reads q[b, t, q_off + h * D : ... + D] (k, v likewise), so the stacked q/k/v projection's
        output [B, T, 3E] is passed three times with offsets 0, E, 2E and nothing is split or transposed; o is
        [B, T, E], the out projection's input. kt is a scratch buffer (K transposed per head, in 64-key chunks).
        D % 64 == 0, S <= ``MAX_KEYS``; every size a runtime argument.

The work, one task per (batch, head): K transposed into kt (16 keys at a time; the head's 64-key chunks then
contiguous and in L2 for what follows), then per block of ``QUERIES`` queries: scores for 64 keys at a time as
broadcast-FMAs of q[i, d] into 4 x 16-lane accumulators per query over d, a 16-key tail likewise; the softmax
(max, a vectorised polynomial exp, sum) in 16 lanes; then o = p v as broadcast-FMAs of p[i, j] into 4 x 16-lane
accumulators per query over j, 64 values of d at a time. TVM's exp on llvm is a libm call per element, hence
``kernels._exp``. A first version packed every head's K in a parallel loop of its own and split the queries into
tasks: at batch 64 the packed K (50 MB) was out of cache when read, 0.98x of torch's attention in ViT-B/16;
packing inside the head's task, 1.09x at batch 1 and 64 (``python benchmarks/ab.py --base 02ec6ac --model
vit_b16 --rounds 5``; ``--batch 64 --rounds 3 --calls 2``: 52.49 -> 48.37 ms, 2649 -> 2440 ms a forward).

Example:
    >>> func = attention_func("srigl_attention")                       # doctest: +SKIP
"""

from __future__ import annotations

from ..runtime.attention_op import HEAD_MULTIPLE, MAX_KEYS
from ._tvm_compat import import_tvm
from .kernels import _exp

__all__ = ["attention_func", "QUERIES", "KEY_CHUNK"]

# queries per block: 6 x 4 accumulators of 16 lanes (24 of AVX-512's 32 registers). ViT-B/16's attention, 197
# tokens, 12 heads, 2-core Xeon, kernel alone: 4 queries 0.669 ms, 6 0.609, 7 0.611, 8 0.790 (spills)
QUERIES = 6
KEY_CHUNK = HEAD_MULTIPLE  # keys per score block, and values of d per output block (hence head dims' multiple)
# (MAX_KEYS: the scores of a block's queries live in a [QUERIES, MAX_KEYS] stack buffer)


def attention_func(symbol: str):
    """The ``attention`` PrimFunc (module docstring)."""
    tvm = import_tvm()
    from tvm.script import tirx as T

    te = tvm.te
    qb, ch = QUERIES, KEY_CHUNK

    def exp(x):
        return _exp(te, x)

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, kt_h: T.handle, o_h: T.handle, heads: T.int64,
                  q_off: T.int64, k_off: T.int64, v_off: T.int64, scale: T.float32):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "attention"})
        batch, rows, keys, wq, wk, wv = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        hd, chunks = T.int64(), T.int64()
        q = T.match_buffer(q_h, (batch, rows, wq), "float32")
        k = T.match_buffer(k_h, (batch, keys, wk), "float32")
        v = T.match_buffer(v_h, (batch, keys, wv), "float32")
        kt = T.match_buffer(kt_h, (batch, heads, chunks, hd, ch), "float32")
        o = T.match_buffer(o_h, (batch, rows, heads * hd), "float32")
        k16 = (keys + 15) // 16 * 16
        # A task is one (batch, head): K transposed into kt first (16 keys at a time, their rows staying in L1
        # across d; the last block zero-padded), read back from L2 by every block of queries after it.
        blocks = (rows + qb - 1) // qb
        for task in T.parallel(batch * heads):
            b = task // heads
            h = task % heads
            for jb in range(keys // 16):
                for d in range(hd):
                    for lane in T.unroll(16):
                        kt[b, h, jb // 4, d, jb % 4 * 16 + lane] = k[b, jb * 16 + lane, k_off + h * hd + d]
            for d in range(hd):
                for j in range(k16 - keys // 16 * 16):
                    kt[b, h, keys // ch, d, keys // 16 % 4 * 16 + j] = T.if_then_else(
                        keys // 16 * 16 + j < keys, k[b, T.min(keys // 16 * 16 + j, keys - 1), k_off + h * hd + d],
                        T.float32(0))
            for block in range(blocks):
                scores = T.decl_buffer((qb, MAX_KEYS), "float32")
                norm = T.decl_buffer((qb,), "float32")
                part = T.decl_buffer((16,), "float32")
                i0 = block * qb
                for c in range(k16 // ch):
                    acc = T.decl_buffer((qb, ch), "float32")
                    for i in T.unroll(qb):
                        for lane in T.vectorized(ch):
                            acc[i, lane] = T.float32(0)
                    for d in range(hd):
                        for i in T.unroll(qb):
                            for lane in T.vectorized(ch):
                                acc[i, lane] = acc[i, lane] + q[b, T.min(i0 + i, rows - 1), q_off + h * hd + d] * \
                                    kt[b, h, c, d, lane]
                    for i in T.unroll(qb):
                        for lane in T.vectorized(ch):
                            scores[i, c * ch + lane] = acc[i, lane] * scale
                for r in range(k16 % ch // 16):
                    tail = T.decl_buffer((qb, 16), "float32")
                    for i in T.unroll(qb):
                        for lane in T.vectorized(16):
                            tail[i, lane] = T.float32(0)
                    for d in range(hd):
                        for i in T.unroll(qb):
                            for lane in T.vectorized(16):
                                tail[i, lane] = tail[i, lane] + q[b, T.min(i0 + i, rows - 1), q_off + h * hd + d] * \
                                    kt[b, h, k16 // ch, d, r * 16 + lane]
                    for i in T.unroll(qb):
                        for lane in T.vectorized(16):
                            scores[i, k16 // ch * ch + r * 16 + lane] = tail[i, lane] * scale
                for i in range(qb):  # softmax over the keys, from the row's largest score
                    for j in range(k16 - keys):
                        scores[i, keys + j] = T.float32(-3.0e38)
                    for lane in T.vectorized(16):
                        part[lane] = scores[i, lane]
                    for c in range(k16 // 16 - 1):
                        for lane in T.vectorized(16):
                            part[lane] = T.max(part[lane], scores[i, c * 16 + 16 + lane])
                    norm[i] = part[0]
                    for lane in range(15):
                        norm[i] = T.max(norm[i], part[lane + 1])
                    for c in range(k16 // 16):  # (a padded key's exp is ~1e-38: nothing in the sum, unread by p v)
                        for lane in T.vectorized(16):
                            scores[i, c * 16 + lane] = exp(scores[i, c * 16 + lane] - norm[i])
                    for lane in T.vectorized(16):
                        part[lane] = T.float32(0)
                    for c in range(k16 // 16):
                        for lane in T.vectorized(16):
                            part[lane] = part[lane] + scores[i, c * 16 + lane]
                    norm[i] = T.float32(0)
                    for lane in range(16):
                        norm[i] = norm[i] + part[lane]
                    norm[i] = T.float32(1) / norm[i]
                for dc in range(hd // ch):
                    out = T.decl_buffer((qb, ch), "float32")
                    for i in T.unroll(qb):
                        for lane in T.vectorized(ch):
                            out[i, lane] = T.float32(0)
                    for j in range(keys):
                        for i in T.unroll(qb):
                            for lane in T.vectorized(ch):
                                out[i, lane] = out[i, lane] + scores[i, j] * v[b, j, v_off + h * hd + dc * ch + lane]
                    for i in range(qb):
                        if i0 + i < rows:
                            for lane in T.vectorized(ch):
                                o[b, i0 + i, h * hd + dc * ch + lane] = out[i, lane] * norm[i]

    return attention
