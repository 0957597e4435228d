"""The torch side of the compiled kernels: ``torch.ops.srigl_compile.tvm_condensed_linear`` and kernel handles.

``build_condensed_linear`` compiles (or fetches) the kernels of one layer shape and registers a ``KernelHandle``
under ``handle.key``. The operator looks the handle up by that key, so the module keeps owning its tensors and
the graph only holds a string:

    tvm_condensed_linear(x [..., n_in], values [n_out, k], indices [n_out, k], bias [n_out]?, kernel_key,
                         col_threshold) -> [..., n_out]

Batches (rows of the flattened x) of 1-2 rows run the row kernel on x as is (given the indices viewed as 64-bit
words, see ``kernels.row_kernel``); up to ``col_threshold`` rows are
packed into 8-row tiles [B / 8, n_in, 8] for the mid kernel (the col kernel at one vector of lanes: x[idx] is a
vector load shared by 8 rows, not a gather), larger ones into [B / lanes, n_in, lanes] tiles for the col kernel.
Packing is a TVM kernel (zero-padding; torch's permuted copy is slow here), into a reused scratch buffer; the col
kernels write y as [B, n_out]. From ``FUSED_TILES_PER_THREAD`` full tiles a thread, the fused col kernel runs
instead: a task per tile packs it into a local buffer and runs every row on it, so the tiles never go out to
memory and back (fc2 at 2048 rows: 25.7 -> 21.0 ms; at 12608: 165 -> 127 ms; equal where n_in is 768).
The operator has a fake implementation, so ``torch.fx.symbolic_trace``, ``torch.export`` and
``torch.compile(fullgraph=True)`` keep it as one node; it passes ``torch.library.opcheck``. Inputs must be float32
CPU tensors for llvm handles (CUDA tensors for ``cuda_build`` handles, which run through the same op); the kernel
does no bounds checks, so indices must come through ``handle.pack`` (which checks them).

Example:
    >>> h = build_condensed_linear(768, 3072, 307, "int16", True)          # doctest: +SKIP
    >>> values, indices = h.pack(values, indices)    # once, when lowering   # doctest: +SKIP
    >>> y = condensed_linear(x, values, indices, bias, h.key)                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DeviceError, InferenceOnlyError, LoweringError
from .rules import ColParams, RowParams
from .scratch import scratch

__all__ = ["KernelHandle", "build_condensed_linear", "condensed_linear", "register_handle", "get_handle",
           "get_registered", "pack_operands", "block_rows", "check_batch_input", "check_cpu_float32", "check_bias",
           "KernelDeviceError", "KernelDtypeError", "KernelShapeError", "K_MULTIPLE", "DEFAULT_COL_THRESHOLD"]

log = logging.getLogger(__name__)

K_MULTIPLE = 8  # kernels are compiled for k rounded up to this (zero weights on the row's last index)
# Kernel per batch size, measured on Zen 3 (2 threads), 3072 -> 768 at 90%: row (gathers) 53 us at 1 row, 90 at 2,
# then +50 us a row; mid (8-lane tiles) ~110 us per 8 rows from 1 to 8 rows; col (64-lane tiles) ~510 us from 1
# to 64 rows. So: row for 1-2 rows, mid below 49, col from 49 on.
DEFAULT_COL_THRESHOLD = 49
MID_FROM = 3  # batches from here up to col_threshold run the 8-lane mid kernel
MID_LANES = 8  # batch rows per tile of the mid-batch kernel: one AVX2 vector
# From this many full tiles a thread, the tiles are packed inside the col kernel's tasks (one task a tile: fewer
# tiles leave threads idle; at 3 tiles on 2 threads it was slower, at 4 about even, from 8 on faster).
FUSED_TILES_PER_THREAD = 4
_TORCH_INDEX = {"int16": torch.int16, "int32": torch.int32}


class KernelDeviceError(DeviceError, ValueError):
    """The input is not on the CPU (the llvm kernels run on the host CPU)."""


class KernelDtypeError(DeviceError, TypeError):
    """The input is not float32."""


class KernelShapeError(LoweringError, ValueError):
    """The input's shape does not fit the layer (features, channels, dimensions); lowered layers add their name."""


@dataclasses.dataclass(eq=False)
class KernelShapeFields:
    """What every kernel handle (CPU or CUDA) records about its layer."""

    key: str
    n_out: int
    n_in: int
    k: int
    k_pad: int
    index_dtype: str
    has_bias: bool


@dataclasses.dataclass(eq=False)
class KernelHandle(KernelShapeFields):
    """Compiled row and col kernels of one shape; call it like the op (``h(x, values, indices, bias)``).

    Attributes:
        key: registry key (what the op's ``kernel_key`` names).
        n_out, n_in, k: the layer's shape (k = its real fan-in); ``k_pad`` = the kernel's k.
        index_dtype: "int16" or "int32"; has_bias: whether the kernels take a bias.
        target: the llvm target dict; row_params / col_params: the compiled variants.
        module: the TVM module holding both functions (for ``export_kernels``).
    """

    target: dict[str, Any]
    row_params: RowParams
    col_params: ColParams
    module: Any
    library_path: str | None = None
    device_type = "cpu"
    row_fn: Any = dataclasses.field(init=False, repr=False)
    col_fn: Any = dataclasses.field(init=False, repr=False)
    pack_fn: Any = dataclasses.field(init=False, repr=False)
    mid_fn: Any = dataclasses.field(init=False, repr=False)
    packmid_fn: Any = dataclasses.field(init=False, repr=False)
    fused_fn: Any = dataclasses.field(init=False, repr=False, default=None)
    fused_from_tiles: int = dataclasses.field(init=False, repr=False, default=0)
    missing_features: tuple = dataclasses.field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        from ._tvm_compat import tvm_thread_count
        from .cpu_target import missing_host_features
        from .tuning import KernelShape

        shape = KernelShape(self.n_out, self.n_in, self.k_pad, self.index_dtype, self.has_bias)
        functions = (self.module[shape.symbol(layout)] for layout in ("row", "col", "pack", "mid", "packmid"))
        self.row_fn, self.col_fn, self.pack_fn, self.mid_fn, self.packmid_fn = functions
        # (libraries saved before the fused kernel existed lack it: they keep the separate pack)
        fused = shape.symbol("fused")
        self.fused_fn = self.module[fused] if self.module.implements_function(fused, True) else None
        threads = int(os.environ.get("TVM_NUM_THREADS") or tvm_thread_count())
        self.fused_from_tiles = FUSED_TILES_PER_THREAD * threads
        self.missing_features = missing_host_features(self.target)

    @property
    def lanes(self) -> int:
        return self.col_params.lanes

    def pack(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel operands from a condensed layer's (values, indices) [n_out, k]: float32, the index dtype, k padded
        to ``k_pad`` with zero weights on each row's last index (rows stay sorted), contiguous. Do it once.

        Raises:
            ValueError: wrong shapes, or an index outside [0, n_in).
        """
        return pack_operands(self, values, indices, torch.float32)

    def __call__(self, x, values, indices, bias=None, col_threshold: int = DEFAULT_COL_THRESHOLD):
        return condensed_linear(x, values, indices, bias, self.key, col_threshold)

    def check_input(self, x: torch.Tensor) -> None:
        check_runs_here(self)
        check_cpu_float32(x, self.key)
        check_batch_input(x, self)

    def launch(self, rows: torch.Tensor, operands: list[torch.Tensor], col_threshold: int) -> torch.Tensor:
        """y [m, n_out] for rows [m, n_in] (contiguous, m >= 1)."""
        m, n_out = rows.shape[0], self.n_out
        if m < MID_FROM:
            out = rows.new_empty(m, n_out)
            values, indices, *bias = operands
            self.row_fn(rows, values, indices.view(torch.int64), *bias, out)  # the row kernel reads index words
            return out
        if m < col_threshold:
            return self._tiled(rows, operands, self.packmid_fn, self.mid_fn, MID_LANES)
        full, tail = divmod(m, self.lanes)
        if self.fused_fn is not None and full >= self.fused_from_tiles:
            # Enough tiles for every thread: a task per tile packs it into a local buffer and runs all rows on
            # it, instead of packing every tile out to memory (DRAM-bound at large batch) and reading it back.
            y = rows.new_empty(-(-m // self.lanes) * self.lanes, n_out)
            self.fused_fn(rows, *operands, y.view(-1, self.lanes, n_out))
            return y[:m] if tail else y
        if not full or not tail or tail > self.lanes // 2:
            return self._tiled(rows, operands, self.pack_fn, self.col_fn, self.lanes)
        # A ragged tail (ViT's 197 tokens = 3 x 64 + 5) would fill a whole 64-lane tile mostly with padding, at the
        # cost of a full tile (~5-7 mid tiles): the full tiles run the col kernel, the tail the 8-lane one.
        split = full * self.lanes
        y = rows.new_empty(split + -(-tail // MID_LANES) * MID_LANES, n_out)
        self._tiled(rows[:split], operands, self.pack_fn, self.col_fn, self.lanes, y[:split])
        self._tiled(rows[split:], operands, self.packmid_fn, self.mid_fn, MID_LANES, y[split:])
        return y[:m]

    def _tiled(self, rows, operands, pack, col, lanes: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """y [m, n_out] from a batch-tiled kernel; ``out`` (when given) has the rows rounded up to ``lanes``."""
        m, n_out = rows.shape[0], self.n_out
        tiles = -(-m // lanes)
        xt = scratch("tiles", (tiles, self.n_in, lanes))  # (a fresh one is page-faulted in on every call)
        pack(rows, xt)  # [m, n_in] -> [tiles, n_in, lanes], zero-padded
        y = rows.new_empty(tiles * lanes, n_out) if out is None else out
        col(xt, *operands, y.view(tiles, lanes, n_out))  # writes y as [B, n_out] directly
        return y[:m] if tiles * lanes != m else y  # the padding rows are at the end: still contiguous


def pack_operands(handle, values: torch.Tensor, indices: torch.Tensor, value_dtype: torch.dtype):
    """(values, indices) [n_out, k] as a handle's kernel operands: ``value_dtype``, its index dtype, k padded to
    ``handle.k_pad`` with zero weights on each row's last index (rows stay sorted), contiguous.

    Raises:
        ValueError: wrong shapes, or an index outside [0, n_in) (the kernels do no bounds checks).
    """
    if tuple(values.shape) != (handle.n_out, handle.k) or tuple(indices.shape) != (handle.n_out, handle.k):
        raise ValueError(f"kernel {handle.key} takes values and indices of shape ({handle.n_out}, {handle.k}); got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= handle.n_in):
        raise ValueError(f"indices must lie in [0, {handle.n_in}) for kernel {handle.key}")
    values = values.detach().to(value_dtype)
    indices = indices.detach().to(_TORCH_INDEX[handle.index_dtype])
    extra = handle.k_pad - handle.k
    if extra:
        values = torch.cat([values, values.new_zeros(handle.n_out, extra)], dim=1)
        indices = torch.cat([indices, indices[:, -1:].expand(handle.n_out, extra)], dim=1)
    return values.contiguous(), indices.contiguous()


def block_rows(operand: torch.Tensor, rows: int, k_tile: int) -> torch.Tensor:
    """[n, k] -> [ceil(n / rows), k / k_tile, rows, k_tile], contiguous: row block by row block, k-tile by k-tile,
    the order a kernel task reads them in; zero rows fill the last block (zero weights, index 0, in range)."""
    n, k = operand.shape
    blocks = -(-n // rows)
    if blocks * rows != n:
        operand = torch.cat([operand, operand.new_zeros(blocks * rows - n, k)])
    return operand.view(blocks, rows, k // k_tile, k_tile).permute(0, 2, 1, 3).contiguous()


def check_cpu_float32(x: torch.Tensor, key: str) -> None:
    """The CPU kernels' input check: a float32 tensor on the CPU, else a typed error naming the fix."""
    if not x.is_cpu:  # (x.device.type costs 0.4 us; this path is per call)
        raise KernelDeviceError(f"kernel {key} runs on the CPU but got a tensor on {x.device}; move the "
                                "input (and the layer) to the CPU with .cpu()")
    if x.dtype != torch.float32:
        raise KernelDtypeError(f"kernel {key} takes float32 inputs, got {x.dtype}; call .float() on it")


def check_runs_here(handle) -> None:
    """Kernels compiled for a CPU with instructions this one lacks would kill the process (SIGILL): refuse."""
    if handle.missing_features:
        mcpu = handle.target.get("mcpu")
        raise KernelDeviceError(
            f"kernel {handle.key} was compiled for {mcpu}, whose instructions {list(handle.missing_features)} this "
            f"CPU lacks: running it would crash the process. Lower for this machine (target='llvm'), or run the "
            f"model on a {mcpu} machine.")


def check_no_grad(x: torch.Tensor, key: str) -> None:
    """The kernels have no backward: an input that autograd tracks would otherwise leave every parameter upstream
    of the layer without a gradient, silently."""
    if x.requires_grad and torch.is_grad_enabled():
        raise InferenceOnlyError(
            f"kernel {key} got an input that requires grad: lowered layers run inference only (no backward). "
            "Call the model under torch.no_grad() or torch.inference_mode(), or train the sparse model from "
            "sparsify() and lower it afterwards.")


def check_float32_operands(values: torch.Tensor, bias: torch.Tensor | None, key: str) -> None:
    """A lowered model converted after lowering (``.half()``, ``.double()``) no longer matches its kernels."""
    for tensor in (values, bias):
        if tensor is not None and tensor.dtype != torch.float32:
            raise KernelDtypeError(f"kernel {key} runs float32 but the layer holds {tensor.dtype}: a lowered model "
                                   "keeps the dtype lower() gave it; convert the sparse model and lower it again")


def check_bias(handle, bias) -> None:
    """The op got a bias exactly when its kernel was built with one."""
    if (bias is not None) != handle.has_bias:
        raise ValueError(f"kernel {handle.key} was built with has_bias={handle.has_bias}, got bias="
                         f"{'a tensor' if bias is not None else 'None'}")


def check_batch_input(x: torch.Tensor, handle) -> None:
    if x.dim() == 0 or x.shape[-1] != handle.n_in:
        raise KernelShapeError(f"expects {handle.n_in} input features, got an input of shape {tuple(x.shape)} "
                               f"(kernel {handle.key})")


_HANDLES: dict = {}  # key -> KernelHandle (CPU) or cuda_build.CudaKernelHandle


def register_handle(handle):
    _HANDLES[handle.key] = handle
    return handle


def get_registered(key: str):
    """The handle registered under ``key``, or None."""
    return _HANDLES.get(key)


def get_handle(key: str) -> KernelHandle:
    """The registered handle; raises ``LoweringError`` naming the fix when this process has not built/loaded it."""
    try:
        return _HANDLES[key]
    except KeyError:
        raise LoweringError(f"compiled kernel {key!r} is not loaded in this process. A lowered model travels with "
                            "srigl_compile.save_lowered(model, path) and load_lowered(path), which carry its kernels "
                            "(torch.save alone does not); or lower the model again here") from None


def handle_key(n_out, n_in, k, index_dtype, has_bias, target) -> str:
    from .cpu_target import target_key

    return f"o{n_out}_i{n_in}_k{k}_{index_dtype}_{'b' if has_bias else 'nb'}@{target_key(target)}"


def build_condensed_linear(n_out: int, n_in: int, k: int, index_dtype: str = "int32", has_bias: bool = True,
                           target: Mapping[str, Any] | None = None, *, tune: bool = False, cache_dir=None,
                           progress: bool | None = None) -> KernelHandle:
    """Compile (once per process) the kernels of a condensed linear layer and register their handle.

    Args:
        n_out, n_in, k: output rows, input width, fan-in (any k >= 1; kernels use k rounded up to K_MULTIPLE).
        index_dtype: "int16" (n_in <= 32768; less memory traffic) or "int32".
        has_bias: whether the op will be given a bias.
        target: llvm target dict; None detects the host CPU (``cpu_target.host_llvm_target``).
        tune: time each rule's variants for this shape and keep the fastest in the tuning records (a shape is
            tuned once per cache_dir); False uses a stored record if any, else the default variants.
        cache_dir: tuning-record folder (default ``$SRIGL_COMPILE_CACHE`` or ``~/.cache/srigl_compile/tuning``).

    Returns:
        The registered ``KernelHandle``; pass ``handle.key`` to the op.
    """
    from .cpu_target import check_llvm_target
    from .tuning import KernelShape, compile_kernels, select_params

    target = check_llvm_target(target)
    k_pad = -(-k // K_MULTIPLE) * K_MULTIPLE
    shape = KernelShape(n_out, n_in, k_pad, index_dtype, has_bias)
    key = handle_key(n_out, n_in, k, index_dtype, has_bias, target)
    params = {layout: select_params(shape, layout, target, tune=tune, cache_dir=cache_dir, progress=progress)
              for layout in ("row", "col")}
    existing = _HANDLES.get(key)
    if existing is not None and (existing.row_params, existing.col_params) == (params["row"], params["col"]):
        return existing
    executable = compile_kernels(shape, params["row"], params["col"], target)
    return register_handle(KernelHandle(key, n_out, n_in, k, k_pad, index_dtype, has_bias, target, params["row"],
                                        params["col"], executable.mod))


def _operands(handle, values, indices, bias):
    if values.shape[1] != handle.k_pad or indices.dtype != _TORCH_INDEX[handle.index_dtype]:
        values, indices = handle.pack(values, indices)  # slow path: callers should pack once
    check_bias(handle, bias)
    tail = [bias.contiguous()] if bias is not None else []
    return [values.contiguous(), indices.contiguous(), *tail]


def _run(x, values, indices, bias, kernel_key: str, col_threshold: int) -> torch.Tensor:
    handle = get_handle(kernel_key)
    if handle.device_type == "cpu":  # (first: a converted model explains a wrong input dtype too)
        check_float32_operands(values, bias, handle.key)
    handle.check_input(x)
    operands = _operands(handle, values, indices, bias)
    flat = x.dim() == 2  # the common case skips reshape/view (about 4 us of a ~10 us call overhead)
    rows = x if flat else x.reshape(-1, handle.n_in)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], handle.n_out)
    out = handle.launch(rows.contiguous(), operands, col_threshold)
    return out if flat else out.view(*x.shape[:-1], handle.n_out)


# Defined with the low-level Library API rather than torch.library.custom_op: the custom_op wrapper adds about
# 30 us a call (autograd and dynamo layers) to a 20-40 us batch-1 kernel, this about 7 us. FRAGMENT, not DEF: the
# namespace is shared with other srigl_compile ops. The impl is registered for every backend so that a CUDA input
# reaches _run, which raises the typed error naming the fix.
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, str kernel_key, "
            "int col_threshold) -> Tensor")
_LIB.impl("tvm_condensed_linear", _run, "CompositeExplicitAutograd")


@torch.library.register_fake("srigl_compile::tvm_condensed_linear", lib=_LIB)
def _tvm_condensed_linear_fake(x, values, indices, bias, kernel_key, col_threshold):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def condensed_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                     kernel_key: str, col_threshold: int = DEFAULT_COL_THRESHOLD) -> torch.Tensor:
    """Run the kernel registered as ``kernel_key``; plain eager tensors skip the dispatcher (about 10 us),
    tracers (fx proxies, fake/functional tensors, torch.compile) go through ``torch.ops.srigl_compile``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        check_no_grad(x, kernel_key)
        return _run(x, values, indices, bias, kernel_key, col_threshold)
    return torch.ops.srigl_compile.tvm_condensed_linear(x, values, indices, bias, kernel_key, col_threshold)
