"""TIR of the copies around a direct convolution's kernel: padding (and phase-splitting) its input, cropping its
output grid; and of the model's pooling (max, global average) and layer norms, which lowered layers' libraries
carry. Every size is a runtime argument, so one compiled copy serves every layer and image size.

    pad_images(x [N, H, W], y [N, S_h, S_w, R, P], top, left, stride_h, stride_w)
        y[n, a, b, u, v] = x[n, stride_h * u + a - top, stride_w * v + b - left], 0 outside x
        (stride 1: y is x zero-padded to R x P; stride s: the s_h * s_w phase images of that padded x, which is
        what ``runtime.conv_op`` feeds a strided convolution; negative top / left crop)
    crop_grid(g [N, G], y [N, OH, OW], pitch)
        y[n, h, w] = g[n, h * pitch + w]            (the output grid [OH, pitch] without its padding columns)
    (x of pad_images and y of both may be planar: images whose rows are contiguous but which lie further apart
    than their size, ``runtime.conv_geometry``; y of pad_images may have any image and phase strides. The gaps
    between y's planar images are zeroed: the kernels compute lanes there for nothing, and junk left in memory
    could be denormal floats, which cost a microcode assist per instruction)
    max_pool(x [N, H, W], y [N, OH, OW], kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
             dilation_w)      (x's rows and images may lie further apart than their size: a convolution's
                               output grid is read without its crop; y's images too: a band of rows)
        y[n, h, w] = max over the taps (i, j) inside x of x[n, stride_h * h - pad_h + dilation_h * i,
        stride_w * w - pad_w + dilation_w * j]      (``F.max_pool2d``, -inf padding; OH, OW as torch sizes them)
    global_avg_pool(x [N, Q], y [N])
        y[n] = mean over q of x[n, q]       (``F.adaptive_avg_pool2d(x, 1)`` of N images of Q pixels; x may be planar)
    layer_norm(x [M, N], weight [N], bias [N], y [M, N], eps)
        y[m, :] = (x[m, :] - mean) / sqrt(var + eps) * weight + bias      (``F.layer_norm`` over the last dim)
    attention(q, k, v, kt, o, heads, q_off, k_off, v_off, scale)       (``codegen.attention_kernel``)
        o = softmax(q k^T * scale) v per head, read from and written to [B, T, columns]

Why in TVM: torch's pad, permute and crop copies of these small images (0.1-1 MB) cost 30-200 us each inside a
lowered model, mostly thread hand-over between torch's OpenMP pool and TVM's; in TVM they run on the pool the
kernel just used, at memory speed. A task is one image (a channel): per row of y, the part of x it holds is
copied (a contiguous loop at stride 1, which LLVM vectorises) and the rest zeroed. The max-pool is here because a
lowered model's pooling layers (``nn.lowered.LoweredMaxPool2d``) call it from a convolution's library: torch's
NCHW max_pool2d takes 3.1 ms on a ResNet-50 stem's 64x112x112 (2 cores, Zen 3), this 0.27 ms (Xeon, hot). The
max-pool has a loop of its own for stride 2 (a constant stride, which LLVM vectorises as loads and shuffles; a
runtime stride stays scalar): the stem's, hot, 407 -> 266 us (``benchmarks/micro/glue_copies.py``); inside
ResNet-50 at batch 1, 0.52 -> 0.36 ms. (The same loop in the phase split measured 1.0x: it is bound by memory.)
The layer norm is in each linear library: torch's takes 102 us on ViT-B/16's 197x768 tokens inside a model (2
cores, its passive threads woken), this 43 us; at batch 64 (12608 rows) 12.8 ms against 2.5 ms.

Example:
    >>> funcs = glue_funcs(lambda name: f"srigl_glue_{name}")          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from ..runtime.spec import CONV_GLUE
from ._tvm_compat import import_tvm
from .attention_kernel import attention_func

__all__ = ["pad_func", "crop_func", "max_pool_func", "global_avg_pool_func", "layer_norm_func", "rms_norm_func",
           "glue_funcs"]



def pad_func(symbol: str):
    """The ``pad_images`` PrimFunc (module docstring)."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def pad_images(x_handle: T.handle, y_handle: T.handle, top: T.int64, left: T.int64, stride_h: T.int64,
                   stride_w: T.int64):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "pad"})
        n, height, width, x_plane = T.int64(), T.int64(), T.int64(), T.int64()
        phases_h, phases_w, rows, pitch = T.int64(), T.int64(), T.int64(), T.int64()
        y_image, y_phase_h, y_plane = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_handle, (n, height, width), "float32", strides=(x_plane, width, T.int64(1)))
        y = T.match_buffer(y_handle, (n, phases_h, phases_w, rows, pitch), "float32",
                           strides=(y_image, y_phase_h, y_plane, pitch, T.int64(1)))
        flat = T.decl_buffer((n * y_image,), "float32", data=y.data)  # (y's gaps between planar images)
        for image in T.parallel(n):  # (no divisions per row: a 64-bit division by a runtime value is slow)
            for a, b in T.grid(phases_h, phases_w):
                # the columns v whose source column stride_w * v + b - left lies in [0, width)
                first = T.min(T.max((left - b + stride_w - 1) // stride_w, T.int64(0)), pitch)
                end = T.max(T.min((width - 1 + left - b) // stride_w + 1, pitch), first)
                for u in range(rows):
                    source_row = stride_h * u + a - top
                    if source_row >= 0 and source_row < height:
                        for v in range(first):
                            y[image, a, b, u, v] = T.float32(0)
                        if stride_w == 1:  # a contiguous copy (vectorised by LLVM)
                            for v in range(end - first):
                                y[image, a, b, u, first + v] = x[image, source_row, first + v + b - left]
                        else:
                            for v in range(end - first):
                                y[image, a, b, u, first + v] = x[image, source_row,
                                                                 stride_w * (first + v) + b - left]
                        for v in range(pitch - end):
                            y[image, a, b, u, end + v] = T.float32(0)
                    else:
                        for v in range(pitch):
                            y[image, a, b, u, v] = T.float32(0)
                for j in range(T.max(y_plane - rows * pitch, T.int64(0))):  # zeros: no denormal junk in lanes
                    flat[image * y_image + a * y_phase_h + b * y_plane + rows * pitch + j] = T.float32(0)

    return pad_images


def crop_func(symbol: str):
    """The ``crop_grid`` PrimFunc (module docstring)."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def crop_grid(g_handle: T.handle, y_handle: T.handle, pitch: T.int64):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "crop"})
        n, grid, out_h, out_w, plane = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        g = T.match_buffer(g_handle, (n, grid), "float32")
        y = T.match_buffer(y_handle, (n, out_h, out_w), "float32", strides=(plane, out_w, T.int64(1)))
        flat = T.decl_buffer((n * plane,), "float32", data=y.data)  # (y's gaps between planar images)
        for task in T.parallel(n * out_h):
            for w in range(out_w):
                y[task // out_h, task % out_h, w] = g[task // out_h, task % out_h * pitch + w]
            if task % out_h == out_h - 1:  # zeros: no denormal junk in the lanes a kernel computes for nothing
                for j in range(plane - out_h * out_w):
                    flat[task // out_h * plane + out_h * out_w + j] = T.float32(0)

    return crop_grid


def _nan_max(value, current):
    """max(value, current) where a NaN wins, as in torch (T.max would drop it); a TIR expression."""
    from tvm.script import tirx as T

    return T.if_then_else(T.Or(T.isnan(value), value > current), value, current)


def max_pool_func(symbol: str):
    """The ``max_pool`` PrimFunc (module docstring). Per image: y = -inf, then per kernel column j the range of
    output columns whose tap lies inside x (no test per element), per output row the kernel rows inside x."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def max_pool(x_handle: T.handle, y_handle: T.handle, kernel_h: T.int64, kernel_w: T.int64, stride_h: T.int64,
                 stride_w: T.int64, pad_h: T.int64, pad_w: T.int64, dilation_h: T.int64, dilation_w: T.int64):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "max_pool"})
        n, height, width, out_h, out_w = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x_plane, x_pitch, y_plane = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_handle, (n, height, width), "float32", strides=(x_plane, x_pitch, T.int64(1)))
        y = T.match_buffer(y_handle, (n, out_h, out_w), "float32", strides=(y_plane, out_w, T.int64(1)))
        for image in T.parallel(n):
            for h, w in T.grid(out_h, out_w):
                y[image, h, w] = T.float32(float("-inf"))  # (a window wholly in the padding: -inf, as torch)
            for j in range(kernel_w):
                shift = dilation_w * j - pad_w  # tap j of output column w reads column stride_w * w + shift
                first = T.min(T.max((stride_w - 1 - shift) // stride_w, T.int64(0)), out_w)
                end = T.max(T.min((width - 1 - shift) // stride_w + 1, out_w), first)
                for h, i in T.grid(out_h, kernel_h):
                    row = stride_h * h - pad_h + dilation_h * i
                    if row >= 0 and row < height and stride_w == 2:  # (constant stride: LLVM vectorises it)
                        for w in range(end - first):
                            y[image, h, first + w] = _nan_max(x[image, row, 2 * (first + w) + shift],
                                                              y[image, h, first + w])
                    elif row >= 0 and row < height:
                        for w in range(end - first):
                            y[image, h, first + w] = _nan_max(x[image, row, stride_w * (first + w) + shift],
                                                              y[image, h, first + w])

    return max_pool


LANES = 16  # the layer norm's and the average pool's partial sums: one AVX-512 vector (two AVX2 ones)


SUM_BLOCK = 256  # positions summed on their own before joining an image's total (float32 error: see below)


def global_avg_pool_func(symbol: str):
    """The ``global_avg_pool`` PrimFunc (module docstring). A task per block of ``LANES`` images: their sums in
    one vector, over the images' positions (a strided load per image, which LLVM gathers), then the tail images
    one by one. Summing across images rather than within one keeps the vector lanes independent. Each image's
    positions are summed ``SUM_BLOCK`` at a time and the block sums added to its total: one float32 running sum
    over a 2048 x 2048 map of values near 5.5 was 2.5e-2 off (its steps grow past the values added), blocked 5e-6
    (torch's pairwise sum: 1e-7). A CNN's head (7 x 7) is one block."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def global_avg_pool(x_handle: T.handle, y_handle: T.handle):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "global_avg_pool"})
        n, positions, plane = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_handle, (n, positions), "float32", strides=(plane, T.int64(1)))
        y = T.match_buffer(y_handle, (n,), "float32")
        blocks = (positions + SUM_BLOCK - 1) // SUM_BLOCK
        for block in T.parallel((n + LANES - 1) // LANES):
            total = T.decl_buffer((LANES,), "float32")
            part = T.decl_buffer((LANES,), "float32")
            if block * LANES + LANES <= n:
                for lane in T.vectorized(LANES):
                    total[lane] = T.float32(0)
                for b in range(blocks):
                    for lane in T.vectorized(LANES):
                        part[lane] = T.float32(0)
                    for q in range(T.min(positions - b * SUM_BLOCK, SUM_BLOCK)):
                        for lane in T.vectorized(LANES):
                            part[lane] = part[lane] + x[block * LANES + lane, b * SUM_BLOCK + q]
                    for lane in T.vectorized(LANES):
                        total[lane] = total[lane] + part[lane]
                for lane in T.vectorized(LANES):
                    y[block * LANES + lane] = total[lane] / T.Cast("float32", positions)
            else:
                for image in range(n - block * LANES):
                    total[0] = T.float32(0)
                    for b in range(blocks):
                        part[0] = T.float32(0)
                        for q in range(T.min(positions - b * SUM_BLOCK, SUM_BLOCK)):
                            part[0] = part[0] + x[block * LANES + image, b * SUM_BLOCK + q]
                        total[0] = total[0] + part[0]
                    y[block * LANES + image] = total[0] / T.Cast("float32", positions)

    return global_avg_pool


def layer_norm_func(symbol: str):
    """The ``layer_norm`` PrimFunc (module docstring). A task per row: the mean, then the variance of x - mean
    (two passes, as exact as torch's), each summed in ``LANES`` vector lanes (LLVM does not reorder a float sum
    itself) plus a scalar tail; then the affine write, a plain loop LLVM vectorises."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def layer_norm(x_handle: T.handle, w_handle: T.handle, b_handle: T.handle, y_handle: T.handle,
                   eps: T.float32):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "layer_norm"})
        m, n = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (m, n), "float32")
        w = T.match_buffer(w_handle, (n,), "float32")
        b = T.match_buffer(b_handle, (n,), "float32")
        y = T.match_buffer(y_handle, (m, n), "float32")
        body = n // LANES * LANES
        for row in T.parallel(m):
            part = T.decl_buffer((LANES,), "float32")
            stats = T.decl_buffer((2,), "float32")  # mean, then 1 / sqrt(var + eps)
            for lane in T.vectorized(LANES):
                part[lane] = T.float32(0)
            for j in range(n // LANES):
                for lane in T.vectorized(LANES):
                    part[lane] = part[lane] + x[row, j * LANES + lane]
            stats[0] = T.float32(0)
            for lane in range(LANES):
                stats[0] = stats[0] + part[lane]
            for t in range(n - body):
                stats[0] = stats[0] + x[row, body + t]
            stats[0] = stats[0] / T.Cast("float32", n)
            for lane in T.vectorized(LANES):
                part[lane] = T.float32(0)
            for j in range(n // LANES):
                for lane in T.vectorized(LANES):
                    part[lane] = part[lane] + (x[row, j * LANES + lane] - stats[0]) * (x[row, j * LANES + lane]
                                                                                        - stats[0])
            stats[1] = T.float32(0)
            for lane in range(LANES):
                stats[1] = stats[1] + part[lane]
            for t in range(n - body):
                stats[1] = stats[1] + (x[row, body + t] - stats[0]) * (x[row, body + t] - stats[0])
            stats[1] = T.float32(1) / T.sqrt(stats[1] / T.Cast("float32", n) + eps)
            for j in range(n):
                y[row, j] = (x[row, j] - stats[0]) * stats[1] * w[j] + b[j]

    return layer_norm


def rms_norm_func(symbol: str):
    """The ``rms_norm`` PrimFunc: y = w * (x * (1 / sqrt(mean(x^2) + eps))) per row, as Llama-family RMSNorms
    compute it (``nn.norms.LoweredRMSNorm`` passes 1 + weight for Gemma's); a task per row, the sum of squares in
    ``LANES`` vector lanes plus a scalar tail, then the scaled write, a plain loop LLVM vectorises."""
    import_tvm()
    from tvm.script import tirx as T

    @T.prim_func
    def rms_norm(x_handle: T.handle, w_handle: T.handle, y_handle: T.handle, eps: T.float32):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "rms_norm"})
        m, n = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (m, n), "float32")
        w = T.match_buffer(w_handle, (n,), "float32")
        y = T.match_buffer(y_handle, (m, n), "float32")
        body = n // LANES * LANES
        for row in T.parallel(m):
            part = T.decl_buffer((LANES,), "float32")
            scale = T.decl_buffer((1,), "float32")  # the sum of squares, then 1 / sqrt(mean + eps)
            for lane in T.vectorized(LANES):
                part[lane] = T.float32(0)
            for j in range(n // LANES):
                for lane in T.vectorized(LANES):
                    part[lane] = part[lane] + x[row, j * LANES + lane] * x[row, j * LANES + lane]
            scale[0] = T.float32(0)
            for lane in range(LANES):
                scale[0] = scale[0] + part[lane]
            for t in range(n - body):
                scale[0] = scale[0] + x[row, body + t] * x[row, body + t]
            scale[0] = T.float32(1) / T.sqrt(scale[0] / T.Cast("float32", n) + eps)
            for j in range(n):
                y[row, j] = w[j] * (x[row, j] * scale[0])

    return rms_norm


_MAKERS = {"pad": pad_func, "crop": crop_func, "max_pool": max_pool_func, "global_avg_pool": global_avg_pool_func,
           "layer_norm": layer_norm_func, "attention": attention_func, "rms_norm": rms_norm_func}


def glue_funcs(symbol: Callable[[str], str], names: tuple[str, ...] = CONV_GLUE) -> dict:
    """{symbol(name): PrimFunc} for every name in ``names`` (``runtime.spec.CONV_GLUE`` or ``LINEAR_GLUE``)."""
    return {symbol(name): _MAKERS[name](symbol(name)) for name in names}
