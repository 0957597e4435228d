"""``torch.ops.srigl_compile.tvm_condensed_conv2d``: a lowered convolution's call into its direct CPU kernel.

    tvm_condensed_conv2d(x [B, C, H, W], values [n_out, k], columns [n_out, k], bias [n_out]?, kernel_key,
                         kernel_size, padding, dilation, stride) -> y [B, n_out, OH, OW]     (zero padding)

The im2col route copies every input nine times for a 3x3 kernel, packs the copy into tiles and transposes the
output back: those copies cost more than the sparse kernel saved (a lowered ResNet-50 ran slower than dense). Here
the input is padded once (``conv_geometry``) and the offset kernel reads each non-zero's ``lanes`` output
positions as one contiguous run of the padded image; the only other copy drops the padding columns of the output.
Offsets depend on the image size, so they are computed on first use of a size and cached per layer
(``LlvmConvHandle.offsets``). A strided convolution runs as a stride-1 one over the input's phase images
(space-to-depth, ``conv_geometry``): the same one copy of the input, split as it is padded, instead of im2col's
kernel-size-fold blow-up; its columns are remapped once, when lowering. The copies (pad / phase split, the 1x1
strided subsample, the crop) are TVM functions of the kernel's own library (``codegen.glue_kernels``): torch's
copies of these small images cost 30-200 us each inside a model, mostly hand-over between torch's thread pool and
TVM's. Libraries saved before they existed run torch's copies instead.

The operator has a fake implementation (``torch.fx``, ``torch.export``, ``torch.compile(fullgraph=True)`` keep it
as one node) and passes ``torch.library.opcheck``; ``condensed_conv2d`` skips the dispatcher for plain tensors.

Example:
    >>> values, columns = handle.pack(values, columns)                                  # doctest: +SKIP
    >>> y = condensed_conv2d(x, values, columns, bias, handle.key, (3, 3), (1, 1), (1, 1))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .checks import (
    KernelShapeError,
    check_bias,
    check_cpu_float32,
    check_cpu_operands,
    check_no_grad,
    check_residual,
    check_residual_shape,
    check_runs_here,
)
from .conv_geometry import DirectPlan, direct_plan, output_size, phase_kernel, strided_plan
from .registry import get_handle
from .scratch import pad_images, result, scratch

__all__ = ["condensed_conv2d", "subsample_images", "prepare_call", "ConvCall"]


def _pair(values: Sequence[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


@dataclasses.dataclass(frozen=True, eq=False)
class ConvCall:
    """What a convolution call decides from shapes alone: the read plan of the input size, the input's padding
    (and phase split), the layer's offsets for that size and the output layout (``prepare_call``). Calling it
    runs the copies and the kernel on an input of that shape, with the packed operands it was prepared for.
    A lowered layer keeps its last one and calls it again while the input shape and operands stay the same
    (``nn.lowered.LoweredConv``): skipping the checks, plans and offsets lookup took ResNet-50 at batch 1 from
    31.95 to 30.60 ms (52 convolutions, ~26 us a call)."""

    handle: Any
    pads: tuple[int, int, int, int]
    stride: tuple[int, int]
    plan: DirectPlan
    offsets: torch.Tensor
    out_shape: tuple[int, int, int, int]
    cropped: bool  # whether the output grid has padding columns or a ragged last tile to drop

    def __call__(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        handle, plan, batch = self.handle, self.plan, self.out_shape[0]
        if batch == 0:
            return x.new_empty(self.out_shape)
        # The temporaries live in scratch buffers (fresh large tensors are page-faulted in on every call).
        images = _padded_input(handle, x, self.pads, self.stride, plan)
        grid_shape = (batch, handle.n_out, plan.tiles * plan.lanes)
        grid = scratch("grid", grid_shape) if self.cropped else result(grid_shape)  # (uncropped: the result)
        tail = [bias.contiguous()] if handle.has_bias else []
        if residual is not None:  # in the output grid's layout: as it is when uncropped, else placed in a scratch grid
            tail.append(_residual_grid(residual, self.out_shape, plan, self.cropped))
        handle.conv_fn(images.view(batch, -1), values.contiguous(), self.offsets, *tail,
                       grid.view(batch, handle.n_out, plan.tiles, plan.lanes))
        if not self.cropped:
            return grid.view(self.out_shape)
        if handle.crop_fn is not None:
            out = result(self.out_shape)
            handle.crop_fn(grid.view(batch * handle.n_out, -1), out.view(-1, plan.out_h, plan.out_w), plan.pitch)
            return out
        rows = grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))
        # drop the padding columns; clone, not contiguous(): with one image and one channel the crop can be
        # contiguous already, and the result must not be a view of the scratch buffer
        return rows[..., :plan.out_w].clone(memory_format=torch.contiguous_format)


def prepare_call(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                 kernel_key: str, kernel_size, padding, dilation, stride,
                 residual: torch.Tensor | None = None) -> tuple[ConvCall, torch.Tensor]:
    """(the call for this input's shape, the operand values as the kernel reads them), after every check of the
    op (typed errors naming the fix); packs values and columns when the caller has not."""
    handle = get_handle(kernel_key)
    check_runs_here(handle)
    check_cpu_operands(values, bias, handle)
    check_cpu_float32(x, handle.key)
    check_bias(handle, bias)
    check_residual(handle, residual)
    if x.dim() != 4:
        raise KernelShapeError(f"takes images [B, C, H, W] (or [C, H, W]), got an input of shape {tuple(x.shape)} "
                               f"(kernel {handle.key})")
    kernel, padding, dilation, stride = _pair(kernel_size), _pair(padding), _pair(dilation), _pair(stride)
    strided = stride != (1, 1)
    read_kernel = phase_kernel(kernel, stride, dilation) if strided else kernel  # what the offsets index
    width = x.shape[1] * stride[0] * stride[1] * read_kernel[0] * read_kernel[1]
    if width != handle.n_in:
        per_channel = width // x.shape[1] if x.shape[1] else 1  # (phase images x read kernel per channel)
        raise KernelShapeError(f"expects {handle.n_in // per_channel} input channels, got {x.shape[1]} (input shape "
                               f"{tuple(x.shape)}; kernel {handle.key})")
    if not handle.is_packed(values):
        values, columns = handle.pack(values, columns)  # slow path: callers should pack once
    try:
        if strided:
            plan, pads = strided_plan(x.shape[2], x.shape[3], kernel, stride, padding, dilation, handle.lanes)
            read_dilation = (1, 1)
        else:
            plan = direct_plan(x.shape[2], x.shape[3], kernel, padding, dilation, handle.lanes)
            pads, read_dilation = (padding[1], padding[1], padding[0], padding[0] + plan.extra), dilation
    except ValueError as err:  # an image smaller than the kernel (conv_geometry is pure maths: plain ValueError)
        raise KernelShapeError(f"needs images at least as large as its kernel: {err} (kernel {handle.key})") from None
    offsets = handle.offsets(columns, read_kernel, read_dilation, plan)
    cropped = plan.pitch != plan.out_w or plan.positions != plan.tiles * plan.lanes
    out_shape = (x.shape[0], handle.n_out, plan.out_h, plan.out_w)
    return ConvCall(handle, pads, stride, plan, offsets, out_shape, cropped), values


def _run(x, values, columns, bias, kernel_key: str, kernel_size, padding, dilation, stride,
         residual=None) -> torch.Tensor:
    call, values = prepare_call(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride,
                                residual)
    return call(x, values, bias, residual)


def _padded_input(handle, x: torch.Tensor, pads: tuple[int, int, int, int], stride: tuple[int, int],
                  plan) -> torch.Tensor:
    """x zero-padded by ``pads`` (left, right, top, bottom; negative ones crop) into ``plan``'s images, split into
    its s_h * s_w phase images when strided (space-to-depth): [B, C * s_h * s_w, rows, pitch]. One TVM copy where
    the kernel's library holds ``pad_images``, else torch's pad (and permute)."""
    batch, channels = x.shape[:2]
    phases = stride[0] * stride[1]
    if not any(pads) and phases == 1:
        return x.contiguous()
    if handle.pad_fn is not None:
        images = scratch("padded", (batch * channels, stride[0], stride[1], plan.rows, plan.pitch))
        handle.pad_fn(x.contiguous().view(batch * channels, x.shape[2], x.shape[3]), images, pads[2], pads[0],
                      *stride)
        return images.view(batch, channels * phases, plan.rows, plan.pitch)
    images = pad_images(x, pads, "padded") if any(pads) else x.contiguous()
    if phases == 1:
        return images
    split = scratch("phases", (batch, channels * phases, plan.rows, plan.pitch))
    split.view(batch, channels, stride[0], stride[1], plan.rows, plan.pitch).copy_(
        images.view(batch, channels, plan.rows, stride[0], plan.pitch, stride[1]).permute(0, 1, 3, 5, 2, 4))
    return split


def _residual_grid(residual: torch.Tensor, out_shape: tuple, plan, cropped: bool) -> torch.Tensor:
    """The residual [B, n_out, OH, OW] (or anything broadcasting to it) as the kernel's res operand
    [B, n_out, NT, lanes] over the padded output grid [OH, pitch] (the padding positions are cropped away later,
    so what they hold does not matter)."""
    check_residual_shape(residual, tuple(out_shape), "convolution")
    residual = residual.to(torch.float32)
    batch, n_out = out_shape[:2]
    if not cropped:
        return residual.expand(out_shape).contiguous().view(batch, n_out, plan.tiles, plan.lanes)
    grid = scratch("residual", (batch, n_out, plan.tiles * plan.lanes))
    rows = grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))
    rows[..., :plan.out_w].copy_(residual.expand(out_shape))
    return grid.view(batch, n_out, plan.tiles, plan.lanes)


# Low-level Library API, as for tvm_condensed_linear (custom_op's wrapper costs ~30 us a call).
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_condensed_conv2d(Tensor x, Tensor values, Tensor columns, Tensor? bias, str kernel_key, "
            "int[] kernel_size, int[] padding, int[] dilation, int[] stride, Tensor? residual=None) -> Tensor")
_LIB.impl("tvm_condensed_conv2d", _run, "CompositeExplicitAutograd")


@torch.library.register_fake("srigl_compile::tvm_condensed_conv2d", lib=_LIB)
def _tvm_condensed_conv2d_fake(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride,
                               residual=None):
    out = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty(x.shape[0], get_handle(kernel_key).n_out, *out)  # (values are blocked, padded)


def condensed_conv2d(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                     kernel_key: str, kernel_size, padding, dilation, stride=(1, 1),
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """Run the offset kernel registered as ``kernel_key`` (symmetric zero padding; with a stride, ``columns`` are
    the phase convolution's, see ``conv_geometry.phase_columns``); ``residual`` is the tensor a kernel built with
    an "add" epilogue adds to its output. Plain eager tensors skip the dispatcher, tracers go through
    ``torch.ops.srigl_compile``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        check_no_grad(x, kernel_key)
        return _run(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride, residual)
    return torch.ops.srigl_compile.tvm_condensed_conv2d(x, values, columns, bias, kernel_key, list(kernel_size),
                                                        list(padding), list(dilation), list(stride), residual)


def subsample_images(x: torch.Tensor, stride: tuple[int, int], kernel_key: str) -> torch.Tensor:
    """``x[:, :, ::s_h, ::s_w]``, the pixels a strided unpadded 1x1 convolution reads, as contiguous images: one
    TVM copy (the kernel library's ``pad_images`` at that stride) for plain float32 CPU tensors, else the view
    (which the kernel call copies, or a tracer records). The copy lives in a scratch buffer: pass it straight to
    ``condensed_conv2d``."""
    step_h, step_w = int(stride[0]), int(stride[1])
    pad_fn = getattr(get_handle(kernel_key), "pad_fn", None)
    if (pad_fn is None or type(x) is not torch.Tensor or torch.compiler.is_compiling() or x.dim() != 4
            or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0):
        return x[:, :, ::step_h, ::step_w]
    batch, channels, height, width = x.shape
    out_h, out_w = -(-height // step_h), -(-width // step_w)
    images = scratch("subsampled", (batch * channels, 1, 1, out_h, out_w))
    pad_fn(x.contiguous().view(batch * channels, height, width), images, 0, 0, step_h, step_w)
    return images.view(batch, channels, out_h, out_w)
