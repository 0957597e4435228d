"""Where a direct (im2col-free) stride-1 convolution reads: pure integer maths, no TVM.

The input is zero-padded once into images of ``rows x pitch`` (``pitch`` = padded width) and flattened per image.
Output position (h, w) is computed at grid position q = h * pitch + w, for q in [0, tiles * lanes): the grid runs
over the whole padded width (columns w >= out_w are computed and dropped) and is rounded up to whole tiles. Input
r of an output neuron (channel c, kernel row i, kernel column j) then sits at

    offset = c * rows * pitch + i * dilation_h * pitch + j * dilation_w          x_flat[offset + q]

so a non-zero reads ``lanes`` contiguous floats per tile. ``rows`` adds ``extra`` zero rows at the bottom so that
the rounded-up tail of the last channel stays inside the image: max(offset) + tiles * lanes <= channels * rows *
pitch (``DirectPlan.reads_in_bounds`` states it; the property tests check it).

Planar images: the channels of the kernel's input may lie ``plane`` floats apart instead of rows * pitch (any
plane >= rows * pitch, the floats between unused). A plane that is a whole number of vectors (``aligned_plane``)
makes every channel start on a cache line, so a 1x1 convolution's vector loads never split one: a [B, C, 14, 14]
tensor with channel stride 208 instead of 196 (``planar_stride`` recognises one; a 1x1 convolution reads it as it
is, ``planar_plan``).

A strided convolution becomes a stride-1 one over phase images (space-to-depth): with stride s, the padded input
splits into s_h * s_w phase images P[c, a, b][u, v] = x_pad[c, s_h * u + a, s_w * v + b], channel c * s_h * s_w +
a * s_w + b. Tap (i, j) of channel c reads x_pad[s_h * oh + i * d_h, ...] = P[c, (i * d_h) % s_h, ...][oh + (i *
d_h) // s_h, ...]: a tap of a (``phase_kernel``) kernel at dilation 1 over phase channels, so the same offset
kernel runs it without the im2col copy (``phase_columns`` remaps the columns once, ``strided_plan`` sizes the
phase images).

Example:
    >>> plan = direct_plan(14, 14, (3, 3), (1, 1), (1, 1), lanes=64)
    >>> (plan.out_h, plan.out_w, plan.pitch, plan.tiles, plan.extra)
    (14, 14, 16, 4, 3)
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DirectPlan", "direct_plan", "column_offsets", "phase_kernel", "phase_columns", "strided_plan",
           "exact_tile", "output_size", "aligned_plane", "planar_plan", "planar_stride", "pitched_stride",
           "PoolBand", "pool_bands", "VECTOR"]

VECTOR = 16  # floats per AVX-512 vector and per 64-byte cache line: the plane alignment of planar images


@dataclasses.dataclass(frozen=True)
class DirectPlan:
    """How one input size runs: output size, padded image (rows x pitch, ``extra`` zero rows at the bottom),
    grid positions (``positions`` = out_h * pitch), tiles of ``lanes``, and ``plane``: how far apart the input's
    channels lie (rows * pitch, or more for planar images)."""

    out_h: int
    out_w: int
    pitch: int
    rows: int
    extra: int
    positions: int
    tiles: int
    lanes: int
    plane: int

    def reads_in_bounds(self, kernel: tuple[int, int], dilation: tuple[int, int]) -> bool:
        """The farthest read of the last channel's last kernel tap stays inside its (padded) image."""
        last = (kernel[0] - 1) * dilation[0] * self.pitch + (kernel[1] - 1) * dilation[1]
        return self.plane >= self.rows * self.pitch and last + self.tiles * self.lanes <= self.plane


def direct_plan(height: int, width: int, kernel: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], lanes: int) -> DirectPlan:
    """The plan of a stride-1 convolution over ``height x width`` images (symmetric zero padding).

    Raises:
        ValueError: the (padded) input is smaller than the dilated kernel.
    """
    pitch = width + 2 * padding[1]
    out_h = height + 2 * padding[0] - dilation[0] * (kernel[0] - 1)
    out_w = pitch - dilation[1] * (kernel[1] - 1)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input {height}x{width} with padding {padding} is smaller than the kernel {kernel} "
                         f"at dilation {dilation}")
    positions = out_h * pitch
    tiles = -(-positions // lanes)
    overrun = tiles * lanes - positions + dilation[1] * (kernel[1] - 1)  # past the last real row of the image
    extra = -(-overrun // pitch)
    rows = height + 2 * padding[0] + extra
    return DirectPlan(out_h, out_w, pitch, rows, extra, positions, tiles, lanes, rows * pitch)


def aligned_plane(floats: int, vector: int = VECTOR) -> int:
    """``floats`` rounded up to whole vectors: a plane whose channels all start on a vector boundary."""
    return -(-floats // vector) * vector


def planar_plan(plan: DirectPlan, plane: int) -> DirectPlan | None:
    """The plan of an unpadded 1x1 convolution (``plan`` from ``direct_plan``) reading images whose channels lie
    ``plane`` floats apart as they are: no extra rows, when its last tile's reads stay inside a plane; else None."""
    if plane < max(plan.tiles * plan.lanes, plan.positions):
        return None
    return dataclasses.replace(plan, rows=plan.out_h, extra=0, plane=plane)


def planar_stride(x: torch.Tensor) -> int | None:
    """The channel stride of images [B, C, H, W] whose pixels are contiguous per channel and whose channels lie
    plane >= H * W floats apart, batch after batch (``x.stride() == (C * plane, plane, W, 1)``), with the whole
    last plane inside x's storage (its tail floats are then safe to read); None for any other layout."""
    if x.dim() != 4:
        return None
    batch, channels, height, width = x.shape
    plane = x.stride(1)
    if x.stride(3) != 1 or x.stride(2) != width or plane < height * width or x.stride(0) != channels * plane:
        return None
    if x.storage_offset() + batch * channels * plane > x.untyped_storage().nbytes() // x.element_size():
        return None
    return plane


def pitched_stride(x: torch.Tensor) -> tuple[int, int] | None:
    """(plane, pitch) of images [B, C, H, W] whose rows are contiguous and lie pitch >= W floats apart, whose
    channels lie plane >= H * pitch floats apart, batch after batch (``x.stride() == (C * plane, plane, pitch,
    1)``): contiguous and planar images, and a convolution's output grid without its crop (rows of the padded
    width). None for any other layout. (Unlike ``planar_stride`` no read goes past the last pixel, which torch
    keeps inside the storage.)"""
    if x.dim() != 4:
        return None
    channels, height, width = x.shape[1:]
    plane, pitch = x.stride(1), x.stride(2)
    if x.stride(3) != 1 or pitch < width or plane < height * pitch or x.stride(0) != channels * plane:
        return None
    return plane, pitch


def column_offsets(columns: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
                   plan: DirectPlan, n_in: int) -> torch.Tensor:
    """int32 offsets of im2col columns (c * kh * kw + i * kw + j, as the condensed layer stores them, each below
    ``n_in``) in the padded images of ``plan`` (channels ``plan.plane`` apart).

    The int32 bound is checked on the farthest offset any column below ``n_in`` could have, not on the columns'
    values: reading a value into Python would stop a CPU graph recording the first call at a new size."""
    taps = kernel[0] * kernel[1]
    farthest = (-(-n_in // taps) - 1) * plan.plane + (kernel[0] - 1) * dilation[0] * plan.pitch \
        + (kernel[1] - 1) * dilation[1]
    if farthest >= 2**31:
        raise ValueError(f"the padded input ({plan.plane} floats per channel) is too large for int32 offsets")
    columns = columns.long()
    channel, tap = columns // taps, columns % taps
    offsets = channel * plan.plane + tap // kernel[1] * dilation[0] * plan.pitch \
        + tap % kernel[1] * dilation[1]
    return offsets.to(torch.int32).contiguous()


def phase_kernel(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """The kernel size of the stride-1 convolution over phase images (its dilation is 1)."""
    return tuple((d * (k - 1)) // s + 1 for k, s, d in zip(kernel, stride, dilation))


def phase_columns(columns: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
    """int64 im2col columns (c * kh * kw + i * kw + j) remapped to the phase convolution's columns
    (c' * kh' * kw' + i' * kw' + j', c' = c * s_h * s_w + a * s_w + b)."""
    taps = kernel[0] * kernel[1]
    new_h, new_w = phase_kernel(kernel, stride, dilation)
    columns = columns.long()
    channel, tap = columns // taps, columns % taps
    row, col = tap // kernel[1] * dilation[0], tap % kernel[1] * dilation[1]  # where the tap reads, in pixels
    phase_channel = channel * (stride[0] * stride[1]) + row % stride[0] * stride[1] + col % stride[1]
    return phase_channel * (new_h * new_w) + row // stride[0] * new_w + col // stride[1]


def output_size(size: tuple[int, ...], kernel, stride, padding, dilation) -> tuple[int, ...]:
    """A convolution's output size per spatial dim (torch's formula; symmetric zero padding)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(size, kernel, stride, padding,
                                                                                    dilation))


def strided_plan(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], lanes: int) -> tuple[DirectPlan, tuple]:
    """(plan of the phase convolution, ``F.pad`` amounts for x) for a strided convolution of ``height x width``
    images: padding x by the returned amounts (negative ones crop rows and columns no output reads) makes it exactly
    ``s_h * plan.rows`` x ``s_w * plan.pitch``, whose phase images are the plan's padded images.

    Raises:
        ValueError: the padded input is smaller than the dilated kernel.
    """
    out = output_size((height, width), kernel, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(f"input {height}x{width} with padding {padding} is smaller than the kernel {kernel} "
                         f"at dilation {dilation}")
    new = phase_kernel(kernel, stride, dilation)
    plan = direct_plan(out[0] + new[0] - 1, out[1] + new[1] - 1, new, (0, 0), (1, 1), lanes)
    rows, cols = stride[0] * plan.rows, stride[1] * plan.pitch
    pads = (padding[1], cols - width - padding[1], padding[0], rows - height - padding[0])
    return plan, pads


def exact_tile(positions: int, vector: int = 8, widest: int = 64) -> int | None:
    """A tile width (lanes) that divides an unpadded 1x1 convolution's ``positions`` (= out_h * out_w), so its
    grid has no rounded-up tail: no zero rows to pad in, no columns to crop out, no lanes computed for nothing.

    Among the divisors from 32 (or the whole grid, when smaller) up to ``widest``, the one filling its vectors best
    (``lanes / (vector * ceil(lanes / vector))``), the widest on a tie; None when there is none. With AVX2's 8
    lanes and 64 at most: 64 for 56x56 maps, 56 for 28x28, 49 for 14x14 and 7x7 (6 vectors and one scalar lane).
    With AVX-512's 16 and 208 (13 vectors): 112 for 28x28 (7 whole vectors; 56 lanes are 3.5, 1.5x slower), 196
    for 14x14 (12.25 vectors; 49 lanes, 3 and a scalar one, up to 1.9x slower), 49 for 7x7. (The AVX-512 backend
    gives grids of up to 13 vectors that are not whole vectors ``aligned_plane`` tiles instead: 208 lanes for
    14x14, 64 for 7x7, read from planar images.)"""
    fits = [lanes for lanes in range(1, min(positions, widest) + 1) if positions % lanes == 0
            and (lanes >= 32 or lanes == positions)]  # (narrower tiles pay a weight and offset load per vector)
    if not fits:
        return None
    return max(fits, key=lambda lanes: (lanes / (vector * -(-lanes // vector)), lanes))


@dataclasses.dataclass(frozen=True)
class PoolBand:
    """A band of a pooling's output rows [first, end) and the rows [in_first, in_end) of its input they read
    (inside the input), with ``pad_top``: the pooling's top padding for the band read on its own (the global
    padding for the first band, 0 where the band's first window lies inside the input)."""

    first: int
    end: int
    in_first: int
    in_end: int
    pad_top: int


def pool_bands(height: int, kernel: int, stride: int, padding: int, dilation: int, rows: int) -> list[PoolBand]:
    """A pooling over ``height`` input rows (its vertical kernel, stride, padding and dilation) split into bands of
    ``rows`` output rows (the last may be shorter): pooling each band's input rows with its ``pad_top`` gives the
    band's output rows. Bands overlap in their input rows where windows do (a convolution computing each band's
    rows recomputes those).

    Raises:
        ValueError: ``rows`` < 1, or the pooling has no output row.
    """
    (out_h,) = output_size((height,), (kernel,), (stride,), (padding,), (dilation,))
    if rows < 1 or out_h < 1:
        raise ValueError(f"need rows >= 1 and an output row, got rows={rows} for {height} rows pooled by {kernel}")
    bands = []
    for first in range(0, out_h, rows):
        end = min(first + rows, out_h)
        top = stride * first - padding  # the first window's first row (negative: in the padding)
        in_first, in_end = max(top, 0), min(stride * (end - 1) - padding + dilation * (kernel - 1) + 1, height)
        bands.append(PoolBand(first, end, in_first, in_end, in_first - top))
    return bands
