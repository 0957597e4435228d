"""A direct convolution followed by a max-pool, run band by band so that the convolution's output never leaves L2.

    conv_max_pool(x [B, C, H, W], call, values, bias, pool) -> y [B, n_out, PH, PW]

A ResNet stem writes a 64 x 112 x 112 output grid (3.3 MB at batch 1, 211 MB at batch 64) that only its max-pool
reads. Written whole, it leaves the caches: the kernel's stores fetch the lines from memory first, and the pool
reads them back from memory. Measured on the Xeon (2 cores, 2 MB L2 each), the stem's kernel alone: 0.82 ms hot,
1.35 ms right after a forward of the model (before the bands; ``benchmarks/micro/cold_calls.py`` times a call so).
Here the pool's output rows are split into bands (``conv_geometry.pool_bands``); per image and band, the kernel
computes the grid tiles holding the band's input rows into one small scratch buffer (``BAND_BYTES``), reused band
after band, and the pool reads it from there as it is (rows of the padded width) and writes the band's rows of y.

A band's tiles are whole tiles of the convolution's grid (``ConvCall.plan``), so its reads are the whole grid's:
the kernel reads image ``b`` from tile ``t0`` on through a view starting ``t0 * lanes`` floats in, with the same
offsets. Adjacent bands share the rows their windows share, and the tiles around them: the kernel computes those
twice (~5% more work at the stem's band size).

The caller (``nn.conv_pool.LoweredConvMaxPool``) makes ``call`` with ``prepare_call`` (every check of the
convolution op) and passes only plain float32 CPU tensors without a residual; the convolution's library must
hold a max-pool that reads and writes strided images (``pitched_pool``).

Example:
    >>> call, values = conv_op.prepare_call(x, layer.values, layer.indices, layer.bias, key, (7, 7), (3, 3),
    ...                                     (1, 1), (2, 2))                                   # doctest: +SKIP
    >>> y = conv_max_pool(x, call, values, layer.bias, ((3, 3), (2, 2), (1, 1), (1, 1)))      # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .checks import register_fake
from .conv_geometry import output_size, pool_bands
from .conv_op import ConvCall, kept_call, padded_images, plan_call
from .registry import get_handle
from .scratch import result, scratch

__all__ = ["conv_max_pool", "traced_conv_max_pool", "BAND_BYTES"]

BAND_BYTES = 2**20  # a band's output grid: half the Xeon's 2 MB L2, beside the input rows the kernel reads


def conv_max_pool(x: torch.Tensor, call: ConvCall, values: torch.Tensor, bias: torch.Tensor | None,
                  pool: tuple) -> torch.Tensor:
    """``max_pool2d(conv(x), *pool)`` (pool = (kernel, stride, padding, dilation) pairs) band by band (module
    docstring)."""
    handle, plan = call.handle, call.plan
    kernel, stride, padding, dilation = pool
    batch, n_out = call.out_shape[:2]
    out_h, out_w = plan.out_h, plan.out_w
    pooled = output_size((out_h, out_w), kernel, stride, padding, dilation)
    y = result((batch, n_out, *pooled))
    if batch == 0:
        return y
    images = padded_images(call, x)
    band_rows = max(1, BAND_BYTES // (4 * n_out * plan.pitch * stride[0]))  # pool rows: 2 grid rows each at /2
    tail = [bias.contiguous()] if handle.has_bias else []
    values = values.contiguous()
    lanes, length = plan.lanes, images.shape[1]
    bands = pool_bands(out_h, kernel[0], stride[0], padding[0], dilation[0], band_rows)
    for image in range(batch):  # (an image's input rows stay in cache over its bands)
        for band in bands:
            first_tile = band.in_first * plan.pitch // lanes
            tiles = -(-band.in_end * plan.pitch // lanes) - first_tile
            grid = scratch("band", (1, n_out, tiles, lanes))
            start = band.in_first * plan.pitch - first_tile * lanes  # the band's first row, in its grid
            rows = grid.as_strided((n_out, band.in_end - band.in_first, out_w), (tiles * lanes, plan.pitch, 1),
                                   grid.storage_offset() + start)
            handle.conv_fn(images[image, first_tile * lanes:].view(1, length - first_tile * lanes), values,
                           call.offsets, *tail, grid)
            handle.max_pool_fn(rows, y[image, :, band.first:band.end], *kernel, *stride, band.pad_top, padding[1],
                               *dilation)
    return y


# The same as an operator, for tracers (torch.compile, export): eager calls run ``conv_max_pool`` directly. Traced,
# the stem's convolution and max-pool ran one after the other (the grid through memory); the bands took a lowered
# ResNet-50 from 23.16 to 21.83 ms a forward under ``cpu_graph`` when they were built.
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_conv_max_pool(Tensor x, Tensor values, Tensor columns, Tensor? bias, str kernel_key, "
            "int[] kernel_size, int[] padding, int[] dilation, int[] stride, int[] pool_kernel, int[] pool_stride, "
            "int[] pool_padding, int[] pool_dilation) -> Tensor")


def _run(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride, pool_kernel, pool_stride,
         pool_padding, pool_dilation) -> torch.Tensor:
    call, packed = kept_call(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride)
    pool = tuple(tuple(int(v) for v in pair) for pair in (pool_kernel, pool_stride, pool_padding, pool_dilation))
    return conv_max_pool(x, call, packed, bias, pool)


_LIB.impl("tvm_conv_max_pool", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_conv_max_pool", _LIB)
def _tvm_conv_max_pool_fake(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride,
                            pool_kernel, pool_stride, pool_padding, pool_dilation):
    call = plan_call(x, get_handle(kernel_key), kernel_size, padding, dilation, stride)[0]  # (the op's checks)
    pooled = output_size(call.out_shape[2:], pool_kernel, pool_stride, pool_padding, pool_dilation)
    return x.new_empty(call.out_shape[0], call.out_shape[1], *pooled)


def traced_conv_max_pool(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                         kernel_key: str, conv: tuple, pool: tuple) -> torch.Tensor:
    """``conv_max_pool`` as the traced op; ``conv`` = (kernel, padding, dilation, stride) pairs, ``pool`` =
    (kernel, stride, padding, dilation) pairs."""
    return torch.ops.srigl_compile.tvm_conv_max_pool(x, values, columns, bias, kernel_key,
                                                     *(list(pair) for pair in (*conv, *pool)))
