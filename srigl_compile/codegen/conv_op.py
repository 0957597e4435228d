"""Direct condensed convolution on the CPU: ``torch.ops.srigl_compile.tvm_condensed_conv2d`` and its handles.

    tvm_condensed_conv2d(x [B, C, H, W], values [n_out, k], columns [n_out, k], bias [n_out]?, kernel_key,
                         kernel_size, padding, dilation, stride) -> y [B, n_out, OH, OW]     (zero padding)

The im2col route copies every input nine times for a 3x3 kernel, packs the copy into tiles and transposes the
output back: those copies cost more than the sparse kernel saved (a lowered ResNet-50 ran slower than dense). Here
the input is padded once (``conv_geometry``) and the offset kernel reads each non-zero's ``lanes`` output
positions as one contiguous run of the padded image; the only other copy drops the padding columns of the output.
Offsets depend on the image size, so they are computed on first use of a size and cached per layer. A strided
convolution runs as a stride-1 one over the input's phase images (space-to-depth, ``conv_geometry``): one more
copy of the input, instead of im2col's kernel-size-fold blow-up; its columns are remapped once, when lowering.

The operator has a fake implementation (``torch.fx``, ``torch.export``, ``torch.compile(fullgraph=True)`` keep it
as one node) and passes ``torch.library.opcheck``; ``condensed_conv2d`` skips the dispatcher for plain tensors.

Example:
    >>> h = build_condensed_conv(64, 576, 58, "int16", True)                     # doctest: +SKIP
    >>> values, columns = h.pack(values, columns)                              # doctest: +SKIP
    >>> y = condensed_conv2d(x, values, columns, bias, h.key, (3, 3), (1, 1), (1, 1))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .conv_geometry import DirectPlan, column_offsets, direct_plan, output_size, phase_kernel, strided_plan
from .kernel_op import (K_MULTIPLE, KernelShapeError, KernelShapeFields, block_rows, check_bias, check_cpu_float32,
                        check_float32_operands, check_no_grad, check_runs_here, get_handle, get_registered,
                        handle_key, pack_operands, register_handle)
from .rules import ColParams
from .scratch import pad_images, scratch

__all__ = ["ConvKernelHandle", "build_condensed_conv", "condensed_conv2d"]

_SIZES_PER_LAYER = 4  # image sizes whose offsets a layer keeps (each costs 4 bytes per non-zero)


@dataclasses.dataclass(eq=False)
class ConvKernelHandle(KernelShapeFields):
    """The compiled offset kernel of one layer shape (n_in = the im2col width C * kh * kw, for bounds checks).

    Attributes:
        params: the compiled variant (rows per task, k-inner tile, rows interleaved, lanes = positions per tile).
        module: the TVM module holding the kernel (for ``export_kernels``).
    """

    target: dict[str, Any]
    params: ColParams
    module: Any
    library_path: str | None = None
    device_type = "cpu"
    kind = "conv"
    conv_fn: Any = dataclasses.field(init=False, repr=False)
    # columns tensor (one per layer; held weakly, so a freed layer's entries go) -> {image size: offsets}
    _offsets: Any = dataclasses.field(init=False, repr=False, default_factory=WeakIdKeyDictionary)
    missing_features: tuple = dataclasses.field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        from .cpu_target import missing_host_features
        from .tuning import KernelShape

        self.conv_fn = self.module[KernelShape(self.n_out, self.n_in, self.k_pad, self.index_dtype,
                                               self.has_bias).symbol("offset")]
        self.missing_features = missing_host_features(self.target)

    @property
    def lanes(self) -> int:
        return self.params.lanes

    def pack(self, values: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel operands from a condensed conv's (values, im2col columns) [n_out, k]: ``pack_operands``, then
        blocked as the kernel reads them (``block_rows``: [n_out / rows, k_pad / kin, rows, kin]). Do it once."""
        values, columns = pack_operands(self, values, columns, torch.float32)
        return block_rows(values, self.params.rows, self.params.kin), block_rows(columns, self.params.rows,
                                                                                 self.params.kin)

    def is_packed(self, values: torch.Tensor) -> bool:
        return values.dim() == 4 and values.shape[1] * values.shape[3] == self.k_pad

    def offsets(self, columns: torch.Tensor, kernel, dilation, plan: DirectPlan) -> torch.Tensor:
        """``column_offsets`` for this image size, computed once per layer (its columns tensor) and size. The
        cache is per layer, not per handle: layers of one shape share a handle (35 in a ResNet-152 stage), and a
        shared bound would make them evict each other on every call."""
        sizes = self._offsets.get(columns)
        if sizes is None:
            sizes = self._offsets[columns] = {}
        key = (columns._version, kernel, dilation, plan.rows, plan.pitch)
        if key not in sizes:
            if len(sizes) >= _SIZES_PER_LAYER:
                sizes.clear()
            sizes[key] = column_offsets(columns, kernel, dilation, plan)
        return sizes[key]


def build_condensed_conv(n_out: int, n_in: int, k: int, index_dtype: str = "int32", has_bias: bool = True,
                         target: Mapping[str, Any] | None = None, *, tune: bool = False, cache_dir=None,
                         progress: bool | None = None, lanes: int | None = None) -> ConvKernelHandle:
    """Compile (once per process) the offset kernel of a condensed convolution and register its handle.

    Args:
        n_out, k: active filters and fan-in (k is rounded up to a multiple of 8 with zero weights).
        n_in: the im2col width C * kh * kw (the columns must lie below it).
        index_dtype: dtype of the stored columns ("int16" or "int32"); the kernel itself reads int32 offsets.
        tune / cache_dir / progress: as ``build_condensed_linear`` (the search runs on 14x14 images).
        lanes: output positions per tile, overriding the chosen variant's (``conv_geometry.exact_tile``: a width
            that divides a 1x1 layer's grid needs no padding or crop); part of the handle's key.
    """
    from .cpu_target import check_llvm_target
    from .tuning import KernelShape, compile_offset_kernel, select_params

    target = check_llvm_target(target)
    k_pad = -(-k // K_MULTIPLE) * K_MULTIPLE
    shape = KernelShape(n_out, n_in, k_pad, index_dtype, has_bias)
    key = "conv_" + handle_key(n_out, n_in, k, index_dtype, has_bias, target) + (f"_l{lanes}" if lanes else "")
    params = select_params(shape, "offset", target, tune=tune, cache_dir=cache_dir, progress=progress)
    if lanes:
        params = dataclasses.replace(params, lanes=lanes)
    existing = get_registered(key)
    if existing is not None and existing.params == params:
        return existing
    executable = compile_offset_kernel(shape, params, target)
    return register_handle(ConvKernelHandle(key, n_out, n_in, k, k_pad, index_dtype, has_bias, target, params,
                                            executable.mod))


def _pair(values: Sequence[int]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def _run(x, values, columns, bias, kernel_key: str, kernel_size, padding, dilation, stride) -> torch.Tensor:
    handle = get_handle(kernel_key)
    check_runs_here(handle)
    check_float32_operands(values, bias, handle.key)
    check_cpu_float32(x, handle.key)
    check_bias(handle, bias)
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
    batch = x.shape[0]
    try:
        if strided:
            plan, pads = strided_plan(x.shape[2], x.shape[3], kernel, stride, padding, dilation, handle.lanes)
            read_dilation = (1, 1)
        else:
            plan = direct_plan(x.shape[2], x.shape[3], kernel, padding, dilation, handle.lanes)
            pads, read_dilation = (padding[1], padding[1], padding[0], padding[0] + plan.extra), dilation
    except ValueError as err:  # an image smaller than the kernel (conv_geometry is pure maths: plain ValueError)
        raise KernelShapeError(f"needs images at least as large as its kernel: {err} (kernel {handle.key})") from None
    if batch == 0:
        return x.new_empty(0, handle.n_out, plan.out_h, plan.out_w)
    # The temporaries live in scratch buffers (fresh large tensors are page-faulted in on every call).
    images = pad_images(x, pads, "padded") if any(pads) else x.contiguous()
    if strided:  # space-to-depth: [B, C, s_h * rows, s_w * pitch] -> phase images [B, C * s_h * s_w, rows, pitch]
        phases = scratch("phases", (batch, x.shape[1] * stride[0] * stride[1], plan.rows, plan.pitch))
        phases.view(batch, x.shape[1], stride[0], stride[1], plan.rows, plan.pitch).copy_(
            images.view(batch, x.shape[1], plan.rows, stride[0], plan.pitch, stride[1]).permute(0, 1, 3, 5, 2, 4))
        images = phases
    offsets = handle.offsets(columns, read_kernel, read_dilation, plan)
    cropped = plan.pitch != plan.out_w or plan.positions != plan.tiles * plan.lanes
    grid_shape = (batch, handle.n_out, plan.tiles * plan.lanes)
    grid = scratch("grid", grid_shape) if cropped else x.new_empty(grid_shape)  # (uncropped, it is the result)
    tail = [bias.contiguous()] if handle.has_bias else []
    handle.conv_fn(images.view(batch, -1), values.contiguous(), offsets, *tail,
                   grid.view(batch, handle.n_out, plan.tiles, plan.lanes))
    if not cropped:
        return grid.view(batch, handle.n_out, plan.out_h, plan.out_w)
    rows = grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))
    # drop the padding columns; clone, not contiguous(): with one image and one channel the crop can be
    # contiguous already, and the result must not be a view of the scratch buffer
    return rows[..., :plan.out_w].clone(memory_format=torch.contiguous_format)


# Low-level Library API, as for tvm_condensed_linear (custom_op's wrapper costs ~30 us a call).
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_condensed_conv2d(Tensor x, Tensor values, Tensor columns, Tensor? bias, str kernel_key, "
            "int[] kernel_size, int[] padding, int[] dilation, int[] stride) -> Tensor")
_LIB.impl("tvm_condensed_conv2d", _run, "CompositeExplicitAutograd")


@torch.library.register_fake("srigl_compile::tvm_condensed_conv2d", lib=_LIB)
def _tvm_condensed_conv2d_fake(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride):
    out = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty(x.shape[0], get_handle(kernel_key).n_out, *out)  # (values are blocked, padded)


def condensed_conv2d(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None,
                     kernel_key: str, kernel_size, padding, dilation, stride=(1, 1)) -> torch.Tensor:
    """Run the offset kernel registered as ``kernel_key`` (symmetric zero padding; with a stride, ``columns`` are
    the phase convolution's, see ``conv_geometry.phase_columns``); plain eager tensors skip the dispatcher, tracers
    go through ``torch.ops.srigl_compile``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        check_no_grad(x, kernel_key)
        return _run(x, values, columns, bias, kernel_key, kernel_size, padding, dilation, stride)
    return torch.ops.srigl_compile.tvm_condensed_conv2d(x, values, columns, bias, kernel_key, list(kernel_size),
                                                        list(padding), list(dilation), list(stride))
