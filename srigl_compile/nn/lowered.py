"""Lowered layers: condensed layers whose forward calls a TVM-compiled kernel (``runtime.linear_op`` /
``runtime.conv_op``).

They keep the condensed layers' buffers and full-width/compact output, with the operands packed by the kernel's
handle (fan-in padded to a multiple of 8 with zero weights on each row's last index, so rows stay sorted) and a
kernel key naming the handle in the registry. A convolution runs the route its backend chose (``conv_route``):
"direct", the offset kernel on the padded input (no im2col copy): stride-1 ones and strided 1x1 ones (on the
subsampled input) store global im2col columns, other strided ones the columns of the stride-1 convolution over
the input's phase images; "im2col", the linear kernel on the [B * positions, C * kernel] rows of im2col.
"""

from __future__ import annotations

import dataclasses

import torch

from ..runtime import conv_op, linear_op  # register torch.ops.srigl_compile.tvm_condensed_* (no TVM import)
from ..runtime.checks import KernelDtypeError, KernelShapeError, broadcasts_to, check_no_grad
from ..runtime.conv_geometry import output_size, phase_columns, phase_kernel
from ..runtime.registry import get_handle, get_registered
from ..runtime.spec import KernelSpec, apply_epilogue
from .condensed import CondensedConv, CondensedLinear, accepts_unbatched, index_dtype_for
from .condensed_tensors import operands
from .dense_fallback import dense_form_for, run_dense_if_faster, watched_operands
from .lowered_guards import check_columns, refuse_autograd, refuse_torchscript, refuse_train, with_layer_name
from .traced_dense import dense_form, traced_dense_choice

__all__ = ["LoweredLinear", "LoweredConv", "kernel_operands", "kernel_spec", "can_fuse_epilogue", "fuses_epilogue",
           "make_lowered_", "subsamples", "pointwise_unpadded"]


class LoweredLinear(CondensedLinear):
    """A CondensedLinear running its compiled kernel (``kernel_key``); ``col_threshold`` > 0 forces the
    large-batch kernel from that many rows (0: the kernel's own dispatch)."""

    fused_epilogue = False  # whether the kernel computes the epilogue (else torch does, after the kernel)

    def train(self, mode: bool = True):
        return refuse_train(self, mode)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_tracing():
            refuse_torchscript(self)
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():  # tracers see the buffers as attributes
            if traced_dense_choice(self, x, residual) is not None:  # (the dense path eager calls chose)
                return dense_form(self, x, residual)
            return self._call_kernel(x, self.values, self.indices, self.bias, residual)
        if torch.is_grad_enabled():
            refuse_autograd(self, x, residual)
        form = self.__dict__.get("_dense_form")  # (near-dense CPU layers: ``nn.dense_fallback``)
        if form is not None and (y := run_dense_if_faster(self, form, x, residual, self.kernel_path)) is not None:
            return y
        return self.kernel_path(x, residual)

    def kernel_path(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The layer's output by its kernel, whatever its dense form would choose (an eager call)."""
        values, indices, bias = operands(self)
        check_columns(self, indices)
        row_call = self.__dict__.get("_row_call")  # (the CPU row kernel on operands already checked: 1-2 rows)
        if row_call is not None and (y := row_call(x, values, indices, bias)) is not None:
            return self._finish(y, values, residual)
        return self._call_kernel(x, values, indices, bias, residual)

    def _call_kernel(self, x, values, indices, bias, residual=None) -> torch.Tensor:
        if values.shape[0] == 0:
            return apply_epilogue(self.scatter(x.new_empty(*x.shape[:-1], 0), dim=-1), self.epilogue, residual)
        operand = residual if self.fused_epilogue and "add" in self.epilogue else None  # (else added by torch)
        try:
            y = linear_op.condensed_linear(x, values, indices, bias, self.kernel_key, self.col_threshold, operand)
        except (KernelShapeError, KernelDtypeError) as err:
            raise with_layer_name(err, self) from None
        if type(x) is torch.Tensor and not torch.compiler.is_compiling():
            self._refresh_row_call(values, indices, bias)
        return self._finish(y, values, residual)

    def _refresh_row_call(self, values, indices, bias) -> None:
        """After a full call accepted these operands: the CPU row kernel on them, for the next small eager calls
        (kept while the same operand tensors stay in place; rebuilt when they are replaced)."""
        current = self.__dict__.get("_row_call", False)
        if current is None or (current and current.values is values and current.indices is indices
                                and current.bias is bias):
            return  # (None: this handle has no such call)
        verified = getattr(get_handle(self.kernel_key), "verified_row_call", None)
        self._row_call = verified(values, indices, bias) if verified else None

    def _finish(self, y: torch.Tensor, values: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        y = y if self.compact or values.shape[0] == self.n_out else self.scatter(y, dim=-1)
        return y if self.fused_epilogue else apply_epilogue(y, self.epilogue, residual)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # (_row_call holds compiled functions; a loaded model checks its columns again)
        return {key: value for key, value in state.items() if key not in ("_row_call", "_columns_checked")}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}"

    def _k_label(self) -> str:
        return _kernel_k_label(self)


class LoweredConv(CondensedConv):
    """A CondensedConv running its compiled kernel: the direct kernel when ``direct`` (its backend's
    ``conv_route``), else the linear kernel on im2col rows."""

    direct = False  # (layers saved before the direct kernel existed run im2col)

    # Direct layers hold their operands blocked as the kernel reads them, [row blocks, k / kin, rows, kin]
    # (``LlvmConvHandle.pack``), zero rows filling the last block: k and n_active come from elsewhere.
    kernel_k = 0  # k as the kernel spec pads it (set when lowering; layers saved before: from the blocks)

    @property
    def k(self) -> int:
        if self.values.dim() != 4:
            return self.values.shape[1]
        return self.kernel_k or self.values.shape[1] * self.values.shape[3]  # (shared offsets: blocks are wider)

    @property
    def n_active(self) -> int:
        return self.active.numel() if self.values.dim() == 4 else self.values.shape[0]

    fused_epilogue = False  # whether the kernel computes the epilogue (else torch does, after the kernel)

    def train(self, mode: bool = True):
        return refuse_train(self, mode)

    # whether every consumer reads planar images (``passes/planar_layout.py``): then an output whose planes are not
    # whole vectors is a strided view with its channels on vector boundaries (``runtime.conv_geometry``)
    planar_output = False
    # whether every consumer reads images with any row pitch (a lowered max-pool): then an output grid with padding
    # columns is returned as it is, a strided view, without the crop copy
    pitched_output = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_tracing():
            refuse_torchscript(self)
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():
            if traced_dense_choice(self, x, residual) is not None:  # (the dense path eager calls chose)
                return dense_form(self, x, residual)
            return self.kernel_path(x, residual)
        if torch.is_grad_enabled():
            refuse_autograd(self, x, residual)
        if (form := self.__dict__.get("_dense_form")) is not None and (  # (near-dense CPU layers)
                y := run_dense_if_faster(self, form, x, residual, self.kernel_path)) is not None:
            return y
        return self.kernel_path(x, residual)

    def kernel_path(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The layer's output by its kernel, whatever its dense form would choose."""
        compiling = torch.compiler.is_compiling()
        repeat = None if compiling else self.__dict__.get("_repeat")
        held = operands(self)
        if not compiling and type(x) is torch.Tensor:
            check_columns(self, held[1])
        operand = residual if self.fused_epilogue else None  # (else torch adds it, after the kernel)
        if repeat is not None and (y := repeat(x, operand, held)) is not None:
            y = self.scatter(y, dim=1)
            return y if self.fused_epilogue else apply_epilogue(y, self.epilogue, residual)
        return self._forward(x, residual)

    @accepts_unbatched
    def _forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.direct:
            y = self._forward_direct(x, residual if self.fused_epilogue else None)
            return y if self.fused_epilogue else apply_epilogue(y, self.epilogue, residual)
        rows, spatial = self.im2col_rows(x)  # [B * L, C * kernel]
        batch = x.shape[0]
        y = linear_op.condensed_linear(rows, self.values, self.indices, self.bias, self.kernel_key, self.col_threshold)
        y = self.scatter(y.view(batch, -1, y.shape[-1]).transpose(1, 2), dim=1)
        return apply_epilogue(y.reshape(batch, y.shape[1], *spatial), self.epilogue, residual)

    def _forward_direct(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        x2, kernel, stride, dilation, padding = self._as_2d(x)  # Conv1d as height 1; padding modes applied
        # a 1x1 kernel without padding: the strided pixels are all it reads, at stride 1
        subsample = stride if subsamples(self) else None
        images = conv_op.subsample_images(x2, stride, self.kernel_key) if subsample else x2
        stride = (1, 1) if subsample else stride
        if residual is not None and type(x) is torch.Tensor and not _kernel_adds(residual, (
                x.shape[0], self.out_width,
                *output_size(images.shape[2:], kernel, stride, padding, dilation)[2 - self.dims:])):
            return self._add_after_kernel(x, residual)
        if self.n_active == 0:  # every filter ablated: no kernel, only the scatter of biases below
            y = x2.new_empty(x2.shape[0], 0, *output_size(images.shape[2:], kernel, stride, padding, dilation))
        else:  # (strided: self.indices hold the phase convolution's columns, see kernel_operands)
            try:
                y = self._run_kernel(x, x2, images, kernel, padding, dilation, stride, subsample, residual)
            except (KernelShapeError, KernelDtypeError) as err:
                raise with_layer_name(err, self) from None
        y = self.scatter(y, dim=1)
        return y.squeeze(2) if self.dims == 1 else y

    def _add_after_kernel(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The fused add when the kernel cannot make it (``_kernel_adds``): the kernel with a zero residual gives
        act(conv + bias), and torch adds the residual and applies the activation. A ReLU would hide the negative
        sums, so for "add_relu" the kernel also runs on -x with residual -2 bias, giving relu(-(conv + bias)); the
        difference of the two is conv + bias, to float32 rounding (the kernel is linear in x)."""
        zero = x.new_zeros(())
        y = self._forward_direct(x, zero)
        if self.epilogue == "add_relu":
            bias = self.bias
            shift = zero if bias is None else (-2 * bias.float()).view(-1, *[1] * self.dims)
            y = y - self._forward_direct(-x, shift)
        return apply_epilogue(y, self.epilogue, residual)

    def _run_kernel(self, x, x2, images, kernel, padding, dilation, stride, subsample, residual):
        """The op on the images (``subsample``: the layer's stride when they are its input's strided pixels);
        eager calls also keep the prepared call for the next ones (``_RepeatConv``)."""
        values, indices, bias = self.values, self.indices, self.bias
        if type(images) is not torch.Tensor or torch.compiler.is_compiling():
            return conv_op.condensed_conv2d(images, values, indices, bias, self.kernel_key, kernel, padding,
                                            dilation, stride, residual, self.planar_output, self.pitched_output)
        check_no_grad(x, self.kernel_key)  # (the layer's input: a subsampled copy no longer carries the flag)
        call, packed = conv_op.prepare_call(images, values, indices, bias, self.kernel_key, kernel, padding,
                                            dilation, stride, residual, self.planar_output, self.pitched_output)
        y = call(images, packed, bias, residual)
        # Repeatable when the layer's own input goes to the op unchanged (no padding-mode copy, no Conv1d view)
        # and its operands are what the kernel reads.
        if x2 is x and packed is values and (residual is None or type(residual) is torch.Tensor):
            self._repeat = _RepeatConv(call, x.shape, x.stride(), None if residual is None else residual.shape,
                                       None if residual is None else residual.stride(), values, indices, bias,
                                       indices._version, subsample)
        return y

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # (_repeat holds compiled functions; a loaded model checks its columns again)
        return {key: value for key, value in state.items() if key not in ("_repeat", "_columns_checked")}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_key.split('@')[0]}, direct={self.direct}"

    def _k_label(self) -> str:
        return _kernel_k_label(self)


def _kernel_k_label(layer) -> str:
    """A lowered layer's values are packed to the kernel's padded width: its repr names SRigL's k (the kernel
    spec's) and the padded width beside it, where this process holds the kernel."""
    handle = get_registered(layer.kernel_key) if layer.kernel_key else None
    if handle is None or handle.spec.k == layer.k:
        return str(layer.k)
    return f"{handle.spec.k} (padded to {layer.k})"


@dataclasses.dataclass(frozen=True, eq=False)
class _RepeatConv:
    """A direct convolution's last eager call, run again for an input of the same shape and strides (and a
    residual of the same shape and strides, or none again: the call may read either as it is laid out) with the
    very operand tensors it was prepared for, unmodified since (the offsets derive from the indices): plain float32
    CPU tensors autograd does not track (a residual too: a float64 one makes a float64 sum, which the full path
    leaves to torch). Anything else returns None, and
    the layer takes the full path (which raises the typed errors). ``subsample``: the stride of a strided 1x1
    layer, whose pixels are picked first."""

    call: conv_op.ConvCall
    x_shape: torch.Size
    x_stride: tuple[int, ...]
    residual_shape: torch.Size | None
    residual_stride: tuple[int, ...] | None
    values: torch.Tensor
    indices: torch.Tensor
    bias: torch.Tensor | None
    version: int
    subsample: tuple[int, int] | None

    def __call__(self, x, residual, held) -> torch.Tensor | None:
        if type(x) is not torch.Tensor or x.shape != self.x_shape or x.stride() != self.x_stride \
                or x.dtype != torch.float32 or not x.is_cpu:
            return None
        grad = torch.is_grad_enabled()
        if residual is None:
            if self.residual_shape is not None:
                return None
        elif (type(residual) is not torch.Tensor or residual.shape != self.residual_shape
              or residual.stride() != self.residual_stride or residual.dtype != torch.float32
              or not residual.is_cpu or (grad and residual.requires_grad)):
            return None
        values, indices, bias = held
        if values is not self.values or indices is not self.indices or bias is not self.bias \
                or indices._version != self.version or (grad and x.requires_grad):
            return None
        if self.subsample is not None:
            x = conv_op.subsample_images(x, self.subsample, self.call.handle.key)
        return self.call(x, values, bias, residual)


def _kernel_adds(residual: torch.Tensor, out_shape: tuple) -> bool:
    """Whether a kernel computes ``out + residual`` as torch would: a residual that broadcasts to the output (not
    one the output broadcasts up to: ``conv(pooled) + x``, a global-context block's add) and whose dtype makes no
    wider result (a float64 residual makes a float64 sum). Anything else that fails to broadcast is the kernel
    check's to name."""
    if type(residual) is not torch.Tensor:  # (fx proxies and fake tensors: the traced op checks)
        return True
    if torch.promote_types(residual.dtype, torch.float32) != torch.float32:
        return False
    return broadcasts_to(residual.shape, out_shape) is not False


def pointwise_unpadded(layer: CondensedConv) -> bool:
    """A 1x1 convolution without padding (zero or other mode): each output reads one pixel."""
    unpadded = layer.padding == "valid" or all(p == 0 for p in layer.padding)
    return unpadded and all(size == 1 for size in layer.kernel_size)


def subsamples(layer: CondensedConv) -> bool:
    """A strided 1x1 convolution without padding: it reads only the strided pixels, so it runs at stride 1 on
    them (a view) rather than over phase images (a copy)."""
    return any(step != 1 for step in layer.stride) and pointwise_unpadded(layer)


def _phase_strides(layer: CondensedConv) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, dilation) as the direct kernel sees them (Conv1d as height 1; 1x1 subsampling at stride 1)."""
    as2d = (lambda p: (1, p[0])) if layer.dims == 1 else tuple
    stride = (1, 1) if subsamples(layer) else as2d(layer.stride)
    return as2d(layer.kernel_size), stride, as2d(layer.dilation)


def kernel_operands(layer, direct: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(kernel input width, values, kernel indices) of a condensed layer, before packing. Convolutions read im2col
    columns; with ``direct`` and a stride, the columns of the stride-1 convolution over phase images."""
    if isinstance(layer, CondensedConv):
        width = layer.in_channels * layer.fan_in // (layer.in_channels // layer.groups)
        columns = layer.global_columns()
        kernel, stride, dilation = _phase_strides(layer)
        if direct and stride != (1, 1):
            new_kernel = phase_kernel(kernel, stride, dilation)
            width = layer.in_channels * stride[0] * stride[1] * new_kernel[0] * new_kernel[1]
            columns = phase_columns(columns, kernel, stride, dilation)
        return width, layer.values, columns.to(index_dtype_for(width))
    return layer.fan_in, layer.values, layer.indices


def is_direct(layer, conv_route: str) -> bool:
    """Whether ``layer`` runs the direct convolution kernel on a backend whose convolutions take ``conv_route``."""
    return conv_route == "direct" and isinstance(layer, CondensedConv)


def kernel_spec(layer, conv_route: str, dtype: str | None = None) -> KernelSpec | None:
    """The KernelSpec of a condensed layer on a backend whose convolutions take ``conv_route`` ("direct" or
    "im2col"), its float dtype named when the backend has several; None for a layer with no active neuron (it
    needs no kernel)."""
    if not layer.n_active:
        return None
    direct = is_direct(layer, conv_route)
    width, values, indices = kernel_operands(layer, direct)
    return KernelSpec(layer.n_active, width, values.shape[1], str(indices.dtype).removeprefix("torch."),
                      layer.bias is not None, dtype, "conv" if direct else "linear",
                      epilogue=layer.epilogue if fuses_epilogue(layer, conv_route) else "")


def can_fuse_epilogue(layer, conv_route: str) -> bool:
    """Whether a layer's kernel can compute an epilogue: one whose output is the layer's output (no scatter of
    ablated neurons after it), a Linear or a 2-d convolution on the direct route; elsewhere (im2col, Conv1d) torch
    computes it after the kernel. Which epilogues a backend's kernels compute is the backend's (``epilogues``)."""
    conv_ok = isinstance(layer, CondensedLinear) or (is_direct(layer, conv_route) and layer.dims == 2)
    return conv_ok and layer.n_active > 0 and (layer.compact or layer.n_active == layer.n_out)


def fuses_epilogue(layer, conv_route: str) -> bool:
    """Whether a layer has an epilogue its kernel computes."""
    return bool(getattr(layer, "epilogue", "")) and can_fuse_epilogue(layer, conv_route)


@torch.no_grad()
def make_lowered_(layer, handle, conv_route: str, col_threshold: int = 0, name: str = "",
                  dense_fallback: bool = False):
    """Turn a condensed layer into its lowered class in place, with operands packed for ``handle`` (None for a
    layer with no active neuron), running the convolution route ``conv_route`` of its backend; ``col_threshold``
    > 0 forces the large-batch kernel from that many rows; ``name`` (its name in the model) is what its errors
    call it; ``dense_fallback``: give a near-dense layer its dense form (``nn.dense_fallback``)."""
    direct = is_direct(layer, conv_route)
    form = None
    if dense_fallback and handle is not None:
        columns = layer.global_columns() if isinstance(layer, CondensedConv) else layer.indices
        form = dense_form_for(layer, layer.values.to(handle.spec.value_dtype), columns)  # (as the kernel rounds)
    _, values, indices = kernel_operands(layer, direct)
    layer.__class__ = LoweredConv if isinstance(layer, CondensedConv) else LoweredLinear
    if layer.n_active:
        layer.values, layer.indices = handle.pack(values, indices)
    layer.kernel_key = handle.key if handle is not None else ""
    layer.col_threshold = col_threshold
    layer.layer_name = name
    layer.fused_epilogue = handle is not None and bool(handle.spec.epilogue)
    if isinstance(layer, LoweredConv):  # (no kernel: the direct route only scatters the biases)
        layer.direct = direct or handle is None
        layer.kernel_k = handle.k_pad if handle is not None and direct else 0
    if form is not None:
        layer._dense_form = dataclasses.replace(form, watched=watched_operands(layer))
    return layer
