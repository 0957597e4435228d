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
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .call_record import may_write_over
from .checks import (
    KernelShapeError,
    check_bias,
    check_cpu_float32,
    check_cpu_operands,
    check_no_grad,
    check_residual,
    check_residual_shape,
    check_runs_here,
    register_fake,
)
from .conv_geometry import (
    VECTOR,
    DirectPlan,
    aligned_plane,
    direct_plan,
    phase_kernel,
    planar_plan,
    planar_stride,
    strided_plan,
)
from .registry import get_handle
from .scratch import pad_images, result, scratch

__all__ = ["condensed_conv2d", "subsample_images", "prepare_call", "kept_call", "plan_call", "padded_images",
           "ConvCall"]


def _pair(values: Sequence[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


@dataclasses.dataclass(frozen=True, eq=False)
class ConvCall:
    """What a convolution call decides from shapes alone: the read plan of the input size, the input's padding
    (and phase split), the layer's offsets for that size and the output layout (``prepare_call``). Calling it
    runs the copies and the kernel on an input of that shape and layout, with the packed operands it was prepared
    for. A lowered layer keeps its last one and calls it again while the input shape, strides and operands stay
    the same (``nn.lowered.LoweredConv``): skipping the checks, plans and offsets lookup took ResNet-50 at batch 1
    from 31.95 to 30.60 ms (52 convolutions, ~26 us a call).

    ``direct``: the input is read as it is (contiguous, or planar images whose channels lie ``plan.plane`` apart);
    else ``planar_input``: the pad copy reads it as the planar images it is.
    ``out_plane``: 0 for a contiguous output, else the channel stride of a planar one (``conv_geometry``), for a
    layer whose consumers all read planar images (``passes/planar_layout.py``).
    ``pitched``: the output is the kernel's grid as it is, a strided view of its rows without the crop copy, for a
    layer whose consumers all read images with any row pitch (a lowered max-pool)."""

    handle: Any
    pads: tuple[int, int, int, int]
    stride: tuple[int, int]
    plan: DirectPlan
    offsets: torch.Tensor | None  # (None: planned only, ``plan_call``)
    out_shape: tuple[int, int, int, int]
    cropped: bool  # whether the output grid has padding columns or a ragged last tile to drop
    direct: bool = False
    out_plane: int = 0
    planar_input: bool = False
    pitched: bool = False

    def result_strides(self) -> tuple[int, int, int, int]:
        """The strides of the tensor a call returns: a view of the output grid (pitched, or planar with the grid
        as its planes), planar images, or contiguous."""
        plan, (batch, n_out, height, width) = self.plan, self.out_shape
        grid_length = plan.tiles * plan.lanes
        if batch and self.cropped and (self.pitched or (plan.pitch == width and grid_length == self.out_plane)):
            return (n_out * grid_length, grid_length, plan.pitch, 1)
        if batch and self.cropped and self.out_plane:
            return (n_out * self.out_plane, self.out_plane, width, 1)
        return (n_out * height * width, height * width, width, 1)

    def __call__(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        handle, plan, batch, n_out = self.handle, self.plan, self.out_shape[0], self.handle.n_out
        if batch == 0:
            return x.new_empty(self.out_shape)
        # The temporaries live in scratch buffers (fresh large tensors are page-faulted in on every call).
        images = padded_images(self, x)
        grid_length = plan.tiles * plan.lanes
        grid_is_plane = plan.pitch == plan.out_w and grid_length == self.out_plane  # (planar: the grid is the result)
        grid_shape = (batch, n_out, grid_length)
        returned = not self.cropped or grid_is_plane or self.pitched  # (a view of it is the result)
        tail = [bias.contiguous()] if handle.has_bias else []
        grid = out = None
        if residual is not None:  # in the output grid's layout: as it is when uncropped, else placed in a scratch grid
            # cropped into a contiguous result: the crop may write it over the residual once the kernel has read it
            # (asked first: the residual's first reader may be its copy into the scratch grid)
            if not returned and not self.out_plane and _is_plain_result(residual, self.out_shape) \
                    and may_write_over(residual):
                out = residual.view(self.out_shape)  # (a tensor of its own, as a result would be)
            res = _residual_grid(handle, residual, self.out_shape, plan, self.cropped)
            tail.append(res)
            if returned and _same_storage(res, residual) and may_write_over(res):  # (only in a CPU graph's replays)
                grid = res.view(grid_shape)
        if grid is None:
            grid = result(grid_shape) if returned else scratch("grid", grid_shape)
        handle.conv_fn(images, values.contiguous(), self.offsets, *tail,
                       grid.view(batch, n_out, plan.tiles, plan.lanes))
        if not self.cropped:
            return grid.view(self.out_shape)
        if self.pitched:
            return grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))[..., :plan.out_w]
        if grid_is_plane:
            return grid[:, :, :plan.out_h * plan.out_w].view(self.out_shape)
        if out is None and self.out_plane:  # cropped into planar images
            out = result((batch, n_out, self.out_plane))[:, :, :plan.out_h * plan.out_w].view(self.out_shape)
        elif out is None:
            out = result(self.out_shape)
        if handle.crop_fn is not None:
            handle.crop_fn(grid.view(batch * n_out, -1), out.view(-1, plan.out_h, plan.out_w), plan.pitch)
        else:  # (a library saved before the glue kernels: torch's copy, into the result, not a view of the grid)
            out.copy_(grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))[..., :plan.out_w])
        return out


def prepare_call(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                 kernel_key: str, kernel_size, padding, dilation, stride,
                 residual: torch.Tensor | None = None, planar_output: bool = False,
                 pitched_output: bool = False) -> tuple[ConvCall, torch.Tensor]:
    """(the call for this input's shape and layout, the operand values as the kernel reads them), after every check
    of the op (typed errors naming the fix); packs values and columns when the caller has not. ``planar_output``:
    the caller's consumers read planar images, so an output whose planes are not whole vectors may be one;
    ``pitched_output``: they read images with any row pitch, so an output grid with padding columns is returned
    as it is (a strided view)."""
    handle = get_handle(kernel_key)
    check_runs_here(handle)
    check_cpu_operands(values, bias, handle)
    check_cpu_float32(x, handle.key)
    check_bias(handle, bias)
    check_residual(handle, residual)
    call, read_kernel, read_dilation = plan_call(x, handle, kernel_size, padding, dilation, stride, planar_output,
                                                 pitched_output)
    if not handle.is_packed(values):
        values, columns = handle.pack(values, columns)  # slow path: callers should pack once
    offsets = handle.offsets(columns, read_kernel, read_dilation, call.plan)
    return dataclasses.replace(call, offsets=offsets), values


def plan_call(x: torch.Tensor, handle, kernel_size, padding, dilation, stride, planar_output: bool = False,
              pitched_output: bool = False) -> tuple[ConvCall, tuple[int, int], tuple[int, int]]:
    """What a call decides from the input's shape and strides alone (``prepare_call``'s flags), without offsets
    (``offsets`` None), and the kernel and dilation the offsets index: (call, read kernel, read dilation). The
    fake implementation plans with it too, so that a tracer sees the strides the call returns."""
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
    try:
        if strided:
            plan, pads = strided_plan(x.shape[2], x.shape[3], kernel, stride, padding, dilation, handle.lanes)
            read_dilation = (1, 1)
        else:
            plan = direct_plan(x.shape[2], x.shape[3], kernel, padding, dilation, handle.lanes)
            pads, read_dilation = (padding[1], padding[1], padding[0], padding[0] + plan.extra), dilation
    except ValueError as err:  # an image smaller than the kernel (conv_geometry is pure maths: plain ValueError)
        raise KernelShapeError(f"needs images at least as large as its kernel: {err} (kernel {handle.key})") from None
    direct, plane = False, planar_stride(x)  # (contiguous images: H * W; None: neither contiguous nor planar)
    if not strided and kernel == (1, 1) and not any(padding):  # read the images as they are where they allow it
        layout = None
        if plane is not None and (handle.planar_glue or plane == x.shape[2] * x.shape[3]):
            layout = planar_plan(plan, plane)
        if layout is not None:
            plan, pads, direct = layout, (0, 0, 0, 0), True
        elif handle.planar_glue:  # no room for the last tile's reads: a copy into aligned planes, no extra rows
            plan, pads = planar_plan(plan, aligned_plane(plan.tiles * plan.lanes)), (0, 0, 0, 0)
    elif handle.planar_glue:  # padded or phase images with their channels on vector boundaries
        plan = dataclasses.replace(plan, plane=aligned_plane(plan.plane))
    cropped = plan.pitch != plan.out_w or plan.positions != plan.tiles * plan.lanes
    out_shape = (x.shape[0], handle.n_out, plan.out_h, plan.out_w)
    positions, grid = plan.out_h * plan.out_w, plan.tiles * plan.lanes
    out_plane, pitched = 0, pitched_output and cropped
    if planar_output and not pitched and handle.planar_glue and cropped and positions % VECTOR:  # (else aligned)
        out_plane = grid if plan.pitch == plan.out_w and grid % VECTOR == 0 else aligned_plane(positions)
    planar_input = handle.planar_glue and plane is not None
    call = ConvCall(handle, pads, stride, plan, None, out_shape, cropped, direct, out_plane, planar_input, pitched)
    return call, read_kernel, read_dilation


# Calls kept by ``kept_call`` (the ops' calls: a tracer's, and ``condensed_conv2d``'s), per layer's columns: a
# compiled ResNet-50 makes 53 convolution calls a forward, and planning each one again took ~17 us of Python. Keyed
# by the columns' id, with a weak reference to them that drops the entry with the tensor (a WeakIdKeyDictionary
# lookup took 1.5-6 us more a call).
# id(columns) -> (a weak reference to them, {call key: (columns version, values, bias, prepared call)})
_PREPARED: dict[int, tuple[weakref.ref, dict]] = {}
PREPARED_PER_LAYER = 8  # input layouts kept per layer (then it starts afresh)


def _run(x, values, columns, bias, kernel_key: str, kernel_size, padding, dilation, stride,
         residual=None, planar_output: bool = False, pitched_output: bool = False) -> torch.Tensor:
    """The op: ``kept_call``, then the call."""
    call, packed = kept_call(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride, residual,
                             planar_output, pitched_output)
    return call(x, packed, bias, residual)


def kept_call(x, values, columns, bias, kernel_key: str, kernel_size, padding, dilation, stride,
              residual=None, planar_output: bool = False, pitched_output: bool = False) -> tuple[ConvCall, Any]:
    """``prepare_call``'s (call, packed values), prepared once per input layout and operand tensors (every check)
    and kept while the input's and residual's shape, strides, dtype and device, the operand tensors and the
    columns' contents stay the same."""
    key = (kernel_key, x.shape, x.stride(), x.dtype, x.device, tuple(kernel_size), tuple(padding), tuple(dilation),
           tuple(stride), planar_output, pitched_output,
           None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device))
    found = _PREPARED.get(id(columns))
    calls = found[1] if found is not None and found[0]() is columns else None
    kept = None if calls is None else calls.get(key)
    if kept is not None and kept[0] == columns._version and kept[1] is values and kept[2] is bias:
        return kept[3], values
    call, packed = prepare_call(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride,
                                residual, planar_output, pitched_output)
    if packed is values and type(columns) is torch.Tensor:  # (the operands the kernel reads: keep the call)
        if calls is None or len(calls) >= PREPARED_PER_LAYER:
            calls = {}
            number = id(columns)
            _PREPARED[number] = (weakref.ref(columns, lambda _: _PREPARED.pop(number, None)), calls)
        calls[key] = (columns._version, values, bias, call)
    return call, packed


def padded_images(call: ConvCall, x: torch.Tensor) -> torch.Tensor:
    """The kernel's input for ``call``: x [B, C, H, W] as it is (``call.direct``) or padded (and phase-split) into
    the plan's images (a scratch buffer), flattened per image: [B, L]."""
    batch, plan = x.shape[0], call.plan
    if call.direct:
        return x.as_strided((batch, x.shape[1] * plan.plane), (x.shape[1] * plan.plane, 1))
    return _padded_input(call.handle, x, call.pads, call.stride, plan, call.planar_input).view(batch, -1)


def _padded_input(handle, x: torch.Tensor, pads: tuple[int, int, int, int], stride: tuple[int, int],
                  plan, planar: bool) -> torch.Tensor:
    """x zero-padded by ``pads`` (left, right, top, bottom; negative ones crop) into ``plan``'s images, split into
    its s_h * s_w phase images when strided (space-to-depth), each ``plan.plane`` floats apart: [B, C * s_h * s_w,
    plane]. One TVM copy where the kernel's library holds ``pad_images`` (reading x as it is when ``planar``: planar
    images, which its glue takes), else torch's pad (and permute)."""
    batch, channels = x.shape[:2]
    phases = stride[0] * stride[1]
    if handle.pad_fn is not None:
        images = scratch("padded", (batch * channels * phases, plan.plane))
        handle.pad_fn(_image_rows(x, planar), _phase_images(images, stride, plan.rows, plan.pitch), pads[2], pads[0],
                      *stride)
        return images.view(batch, channels * phases, plan.plane)
    images = pad_images(x, pads, "padded") if any(pads) else x.contiguous()
    if phases == 1 and plan.plane == plan.rows * plan.pitch:
        return images
    split = scratch("phases", (batch, channels * phases, plan.plane))
    split[:, :, :plan.rows * plan.pitch].view(batch, channels, stride[0], stride[1], plan.rows, plan.pitch).copy_(
        images.view(batch, channels, plan.rows, stride[0], plan.pitch, stride[1]).permute(0, 1, 3, 5, 2, 4))
    return split


def _phase_images(planes: torch.Tensor, stride: tuple[int, int], rows: int, pitch: int) -> torch.Tensor:
    """``planes`` [N * s_h * s_w, plane] (a row per phase image) as pad_images' y, [N, s_h, s_w, rows, pitch], with
    every stride explicit: the kernel zeroes each image's gap up to the next (``plane`` floats apart) by reading
    the phase axes' strides, and a view would give a size-1 phase axis the compact rows * pitch (no gap zeroed)."""
    plane, (s_h, s_w) = planes.stride(0), stride
    return planes.as_strided((planes.shape[0] // (s_h * s_w), s_h, s_w, rows, pitch),
                             (s_h * s_w * plane, s_w * plane, plane, pitch, 1))


def _image_rows(x: torch.Tensor, planar: bool) -> torch.Tensor:
    """Images [B, C, H, W] as the glue kernels' [B * C, H, W] input: as they are when ``planar`` (planar images, and
    a library whose glue takes them), else contiguous."""
    if not planar:
        x = x.contiguous()
    return x.view(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def _is_plain_result(residual: torch.Tensor, out_shape: tuple) -> bool:
    """Whether ``residual`` could be the crop's result as it is: float32, contiguous, of the output's shape."""
    return residual.dtype == torch.float32 and tuple(residual.shape) == tuple(out_shape) and residual.is_contiguous()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _residual_grid(handle, residual: torch.Tensor, out_shape: tuple, plan, cropped: bool) -> torch.Tensor:
    """The residual [B, n_out, OH, OW] (or anything broadcasting to it) as the kernel's res operand
    [B, n_out, NT, lanes] over the padded output grid [OH, pitch] (the padding positions are cropped away later,
    so what they hold does not matter). Placed there by the library's pad (zero right padding) where it has one
    and the residual is images of the output's shape: torch's strided copy took 0.12-0.16 ms a call inside a
    ResNet-34 forward against 0.04 ms hot (the thread pools' hand-over, as for the other glue copies)."""
    check_residual_shape(residual, tuple(out_shape), "convolution")
    residual = residual.to(torch.float32)
    batch, n_out = out_shape[:2]
    length = plan.tiles * plan.lanes
    if cropped and plan.pitch == plan.out_w and residual.shape == out_shape and planar_stride(residual) == length:
        return residual.as_strided((batch, n_out, plan.tiles, plan.lanes), (n_out * length, length, plan.lanes, 1))
    if not cropped:
        return residual.expand(out_shape).contiguous().view(batch, n_out, plan.tiles, plan.lanes)
    grid = scratch("residual", (batch, n_out, plan.tiles * plan.lanes))
    plane = planar_stride(residual) if tuple(residual.shape) == tuple(out_shape) else None
    if handle.pad_fn is not None and plane is not None and (plane == plan.out_h * plan.out_w or handle.planar_glue):
        handle.pad_fn(_image_rows(residual, True), _phase_images(grid.view(batch * n_out, -1), (1, 1), plan.out_h,
                                                                 plan.pitch), 0, 0, 1, 1)
    else:
        rows = grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))
        rows[..., :plan.out_w].copy_(residual.expand(out_shape))
    return grid.view(batch, n_out, plan.tiles, plan.lanes)


# Low-level Library API, as for tvm_condensed_linear (custom_op's wrapper costs ~30 us a call).
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_condensed_conv2d(Tensor x, Tensor values, Tensor columns, Tensor? bias, str kernel_key, "
            "int[] kernel_size, int[] padding, int[] dilation, int[] stride, Tensor? residual=None, "
            "bool planar_output=False, bool pitched_output=False) -> Tensor")
_LIB.impl("tvm_condensed_conv2d", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_condensed_conv2d", _LIB)
def _tvm_condensed_conv2d_fake(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride,
                               residual=None, planar_output=False, pitched_output=False):
    call = plan_call(x, get_handle(kernel_key), kernel_size, padding, dilation, stride, planar_output,
                     pitched_output)[0]
    return x.new_empty_strided(call.out_shape, call.result_strides())  # (the strides the call returns)


_LIB.define("tvm_subsample_images(Tensor x, int[] stride, str kernel_key) -> Tensor")
_LIB.impl("tvm_subsample_images", lambda x, stride, kernel_key: _subsampled(
    x, (int(stride[0]), int(stride[1])), get_handle(kernel_key), result), "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_subsample_images", _LIB)
def _tvm_subsample_images_fake(x, stride, kernel_key):
    return x.new_empty_strided(*_subsampled_layout(get_handle(kernel_key), x.shape, (stride[0], stride[1])))


def condensed_conv2d(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                     kernel_key: str, kernel_size, padding, dilation, stride=(1, 1),
                     residual: torch.Tensor | None = None, planar_output: bool = False,
                     pitched_output: bool = False) -> torch.Tensor:
    """Run the offset kernel registered as ``kernel_key`` (symmetric zero padding; with a stride, ``columns`` are
    the phase convolution's, see ``conv_geometry.phase_columns``); ``residual`` is the tensor a kernel built with
    an "add" epilogue adds to its output; ``planar_output`` and ``pitched_output`` as for ``prepare_call`` (the
    result may then be a strided view). Plain eager tensors skip the dispatcher, tracers go through
    ``torch.ops.srigl_compile``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        check_no_grad(x, kernel_key)
        return _run(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride, residual,
                    planar_output, pitched_output)
    return torch.ops.srigl_compile.tvm_condensed_conv2d(x, values, columns, bias, kernel_key, list(kernel_size),
                                                        list(padding), list(dilation), list(stride), residual,
                                                        planar_output, pitched_output)


def subsample_images(x: torch.Tensor, stride: tuple[int, int], kernel_key: str) -> torch.Tensor:
    """``x[:, :, ::s_h, ::s_w]``, the pixels a strided unpadded 1x1 convolution reads, as images (planar where the
    library's glue writes them, else contiguous): one TVM copy (the kernel library's ``pad_images`` at that
    stride) for float32 CPU images, else the view (which the kernel call copies). Plain tensors get it in a
    scratch buffer (pass it straight to ``condensed_conv2d``); tracers get ``tvm_subsample_images``, whose result
    is a tensor of its own (a traced graph may run other ops before the convolution reads it): under
    ``torch.compile`` the view's copy by torch took ~0.3 ms a call inside ResNet-50."""
    step_h, step_w = int(stride[0]), int(stride[1])
    handle = get_handle(kernel_key)
    if (not isinstance(x, torch.Tensor) or getattr(handle, "pad_fn", None) is None or x.dim() != 4  # (fx: a Proxy)
            or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0):
        return x[:, :, ::step_h, ::step_w]
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return torch.ops.srigl_compile.tvm_subsample_images(x, [step_h, step_w], kernel_key)
    return _subsampled(x, (step_h, step_w), handle, lambda shape: scratch("subsampled", shape))


def _subsampled_layout(handle, shape, steps: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, strides) of ``_subsampled``'s result for images of ``shape``."""
    batch, channels, height, width = shape
    out_h, out_w = -(-height // steps[0]), -(-width // steps[1])
    # planar images (channels on cache-line boundaries) where the library's glue takes them: the kernel's loads
    plane = aligned_plane(out_h * out_w) if getattr(handle, "planar_glue", False) else out_h * out_w
    return (batch, channels, out_h, out_w), (channels * plane, plane, out_w, 1)


def _subsampled(x: torch.Tensor, steps: tuple[int, int], handle, allocate) -> torch.Tensor:
    """x's strided pixels copied by the library's pad into ``allocate((B * C, plane))``, as images."""
    (batch, channels, out_h, out_w), strides = _subsampled_layout(handle, x.shape, steps)
    images = allocate((batch * channels, strides[1]))
    planar = getattr(handle, "planar_glue", False) and planar_stride(x) is not None
    handle.pad_fn(_image_rows(x, planar), _phase_images(images, (1, 1), out_h, out_w), 0, 0, *steps)
    return images[:, :out_h * out_w].view(batch, channels, out_h, out_w)
