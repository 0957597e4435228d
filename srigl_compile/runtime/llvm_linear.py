"""The CPU linear kernels of one shape, and which of them runs for a batch of m rows.

    m < MID_FROM            row kernel on x as is (given the indices viewed as 64-bit words, ``kernels.row_kernel``)
    m < col threshold       x packed into 8-row tiles [m / 8, n_in, 8] for the mid kernel (the col kernel at one
                            vector of lanes: x[idx] is a vector load shared by 8 rows, not a gather)
    beyond                  [m / lanes, n_in, lanes] tiles for the col kernel; from ``FUSED_TILES_PER_THREAD`` full
                            tiles a thread, the fused col kernel (a task per tile packs it into a local buffer and
                            runs every row on it, so the tiles never go out to memory and back: fc2 at 2048 rows
                            25.7 -> 21.0 ms, at 12608 165 -> 127 ms; equal where n_in is 768)

Packing is a TVM kernel (zero-padding; torch's permuted copy is slow here), into a reused scratch buffer; the col
kernels write y as [B, n_out]. The mid, col and fused kernels read the weights blocked as a task reads them
(``tiled_operands``): a copy made on a layer's first call of 3 rows or more and kept with the handle for that layer,
so a model run at such batches holds its condensed weights twice (the row kernel and the state dict keep [n_out,
k]). The col threshold is the handle's (``DEFAULT_COL_THRESHOLD``, measured) unless the
caller forces one (a layer lowered with ``col_threshold=``).

Example:
    >>> handle = get_handle(key)                                # doctest: +SKIP
    >>> y = handle.launch(rows, [values, indices, bias], 0)     # 0: the handle's own threshold   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import LoweringError
from .call_record import may_write_over
from .checks import check_batch_input, check_cpu_float32, check_runs_here
from .cpu_features import host_cpu_name, missing_host_features
from .handle import LinearHandleBase
from .kernel_files import KernelFileError
from .llvm_params import ColParams, RowParams
from .scratch import result, scratch
from .spec import MID_LANES, TORCH_INDEX, KernelSpec, block_rows
from .tvm_runtime import check_wait_policy, import_tvm_runtime, tvm_thread_count

__all__ = ["LlvmLinearHandle", "RowCall", "DEFAULT_COL_THRESHOLD", "MID_FROM", "FUSED_TILES_PER_THREAD",
           "load_cpu_library"]

log = logging.getLogger(__name__)

# Kernel per batch size, measured on Zen 3 (2 threads), 3072 -> 768 at 90%: row (gathers) 53 us at 1 row, 90 at 2,
# then +50 us a row; mid (8-lane tiles) ~110 us per 8 rows from 1 to 8 rows; col (64-lane tiles) ~510 us from 1
# to 64 rows. So: row for 1-2 rows, mid below 49, col from 49 on.
DEFAULT_COL_THRESHOLD = 49
MID_FROM = 3  # batches from here up to the col threshold run the 8-lane mid kernel
# From this many full tiles a thread, the tiles are packed inside the col kernel's tasks (one task a tile: fewer
# tiles leave threads idle; at 3 tiles on 2 threads it was slower, at 4 about even, from 8 on faster).
FUSED_TILES_PER_THREAD = 4
LAYOUTS = ("row", "col", "pack", "mid", "packmid")  # the functions every CPU linear library holds (+ "fused")


@dataclasses.dataclass(eq=False)
class LlvmLinearHandle(LinearHandleBase):
    """Compiled row, mid and col kernels of one shape (and their pack kernels); call it like the op.

    Attributes:
        row_params / col_params: the compiled variants; module: the TVM module holding every function.
        col_threshold: batches (rows) from this size on run the col kernel, unless a call forces another.
    """

    row_params: RowParams
    col_params: ColParams
    module: Any
    library_path: str | None = None
    col_threshold: int = DEFAULT_COL_THRESHOLD
    device_type: ClassVar[str] = "cpu"
    row_fn: Any = dataclasses.field(init=False, repr=False)
    col_fn: Any = dataclasses.field(init=False, repr=False)
    pack_fn: Any = dataclasses.field(init=False, repr=False)
    mid_fn: Any = dataclasses.field(init=False, repr=False)
    packmid_fn: Any = dataclasses.field(init=False, repr=False)
    fused_fn: Any = dataclasses.field(init=False, repr=False, default=None)
    layer_norm_fn: Any = dataclasses.field(init=False, repr=False, default=None)  # (``norm_op``)
    rms_norm_fn: Any = dataclasses.field(init=False, repr=False, default=None)  # (``norm_op``)
    attention_fn: Any = dataclasses.field(init=False, repr=False, default=None)  # (``attention_op``)
    fused_from_tiles: int = dataclasses.field(init=False, repr=False, default=0)
    missing_features: tuple = dataclasses.field(init=False, repr=False, default=())
    _blocked: Any = dataclasses.field(init=False, repr=False, default_factory=WeakIdKeyDictionary)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wait_policy()
        self.row_fn, self.col_fn, self.pack_fn, self.mid_fn, self.packmid_fn = (
            self.module[self.spec.symbol(layout)] for layout in LAYOUTS)
        # (libraries saved before the fused kernel, the layer norm, the attention or the RMS norm existed lack them:
        # the separate pack, torch's layer norm and SDPA, the module's own RMS norm)
        fused = self.spec.symbol("fused")
        self.fused_fn = self.module[fused] if self.module.implements_function(fused, True) else None
        self.layer_norm_fn, self.attention_fn, self.rms_norm_fn = (
            self.module[name] if self.module.implements_function(name, True) else None
            for name in (self.spec.symbol("layer_norm"), self.spec.symbol("attention"), self.spec.symbol("rms_norm")))
        threads = int(os.environ.get("TVM_NUM_THREADS") or tvm_thread_count())
        self.fused_from_tiles = FUSED_TILES_PER_THREAD * threads
        self.missing_features = missing_host_features(self.target)

    @property
    def lanes(self) -> int:
        return self.col_params.lanes

    def check_input(self, x: torch.Tensor) -> None:
        check_runs_here(self)
        check_cpu_float32(x, self.key)
        check_batch_input(x, self)

    def verified_row_call(self, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None):
        """A ``RowCall`` for one layer's operands, which a full call of the op has just checked (None when they
        are not packed for this handle, or the kernel takes a residual: that layer keeps the full path)."""
        if self.missing_features or self.spec.has_residual or values.shape[1] != self.k_pad \
                or values.dtype != self.spec.value_dtype or indices.dtype != TORCH_INDEX[self.index_dtype] \
                or not (values.is_contiguous() and indices.is_contiguous()):
            return None
        return RowCall(self, self.n_in, self.n_out, values, indices, indices.view(torch.int64), bias)

    def tiled_operands(self, operands: list[torch.Tensor]) -> list[torch.Tensor]:
        """[values, indices, (bias)] as the mid, col and fused kernels read them: values and indices blocked by the
        col variant's rows and k-tile (``spec.block_rows``). Made once per layer (keyed by its values tensor, as
        layers of one shape share this handle) and made again when its values or indices change."""
        values, indices, *bias = operands
        entry = self._blocked.get(values)
        if entry is None or entry[0] is not indices or entry[1] != (values._version, indices._version):
            rows, kin = self.col_params.rows, self.col_params.kin
            entry = (indices, (values._version, indices._version),
                     [block_rows(values, rows, kin), block_rows(indices, rows, kin)])
            self._blocked[values] = entry
        return entry[2] + bias

    def launch(self, rows: torch.Tensor, operands: list[torch.Tensor], col_threshold: int,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """y [m, n_out] for rows [m, n_in] (contiguous, m >= 1); ``col_threshold`` <= 0: the handle's own;
        ``residual`` [m, n_out] (contiguous) for a kernel built with an "add" epilogue; where the output is laid out
        as the residual (no padding rows), a CPU graph's recording may have the kernel write over it
        (``call_record.may_write_over``)."""
        m, n_out = rows.shape[0], self.n_out
        res = [] if residual is None else [residual]
        if m < MID_FROM:
            out = residual if res and may_write_over(residual) else rows.new_empty(m, n_out)
            values, indices, *bias = operands
            self.row_fn(rows, values, indices.view(torch.int64), *bias, *res, out)  # (the row kernel reads words)
            return out
        operands = self.tiled_operands(operands)
        if m < (col_threshold if col_threshold > 0 else self.col_threshold):
            over = res and m % MID_LANES == 0 and may_write_over(residual)
            return self._tiled(rows, operands + res, self.packmid_fn, self.mid_fn, MID_LANES,
                               residual if over else None)
        full, tail = divmod(m, self.lanes)
        if self.fused_fn is not None and full >= self.fused_from_tiles:
            # Enough tiles for every thread: a task per tile packs it into a local buffer and runs all rows on
            # it, instead of packing every tile out to memory (DRAM-bound at large batch) and reading it back.
            y = residual if res and not tail and may_write_over(residual) else result(
                (-(-m // self.lanes) * self.lanes, n_out))
            self.fused_fn(rows, *operands, *res, y.view(-1, self.lanes, n_out))
            return y[:m] if tail else y
        if not full or not tail or tail > self.lanes // 2:
            over = res and not tail and may_write_over(residual)
            return self._tiled(rows, operands + res, self.pack_fn, self.col_fn, self.lanes, residual if over else None)
        # A ragged tail (ViT's 197 tokens = 3 x 64 + 5) would fill a whole 64-lane tile mostly with padding, at the
        # cost of a full tile (~5-7 mid tiles): the full tiles run the col kernel, the tail the 8-lane one.
        split = full * self.lanes
        y = result((split + -(-tail // MID_LANES) * MID_LANES, n_out))
        head, rest = ([residual[:split]], [residual[split:]]) if res else ([], [])
        self._tiled(rows[:split], operands + head, self.pack_fn, self.col_fn, self.lanes, y[:split])
        self._tiled(rows[split:], operands + rest, self.packmid_fn, self.mid_fn, MID_LANES, y[split:])
        return y[:m]

    def _tiled(self, rows, operands, pack, col, lanes: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """y [m, n_out] from a batch-tiled kernel; ``out`` (when given) has the rows rounded up to ``lanes``."""
        m, n_out = rows.shape[0], self.n_out
        tiles = -(-m // lanes)
        xt = scratch("tiles", (tiles, self.n_in, lanes))  # (a fresh one is page-faulted in on every call)
        pack(rows, xt)  # [m, n_in] -> [tiles, n_in, lanes], zero-padded
        y = result((tiles * lanes, n_out)) if out is None else out
        col(xt, *operands, y.view(tiles, lanes, n_out))  # writes y as [B, n_out] directly
        return y[:m] if tiles * lanes != m else y  # the padding rows are at the end: still contiguous

    def variant(self) -> tuple:
        return self.row_params, self.col_params

    def manifest_entry(self, folder: Path, stem: str) -> dict[str, Any]:
        return {"row_params": dataclasses.asdict(self.row_params), "col_params": dataclasses.asdict(self.col_params)}

    @classmethod
    def from_manifest(cls, folder: Path, entry: dict[str, Any], spec: KernelSpec, library: Path):
        variants = {"row_params": RowParams(**entry["row_params"]), "col_params": ColParams(**entry["col_params"])}
        return load_cpu_library(cls, folder, entry, spec, library, variants)


def load_cpu_library(cls, folder: Path, entry: dict[str, Any], spec: KernelSpec, library: Path, variants: dict):
    """A CPU handle of ``cls`` on its library, loaded with the TVM runtime (a warning when it was compiled for
    another CPU; running it there is refused if that CPU has instructions this one lacks)."""
    here = _host_cpu_or_none()
    if here is not None and entry["target"].get("mcpu") != here:
        log.warning("kernels in %s were compiled for %s, this CPU is %s", folder, entry["target"].get("mcpu"), here)
    try:
        module = import_tvm_runtime().runtime.load_module(str(library))
        return cls(entry["key"], spec, entry["target"], **variants, module=module, library_path=str(library))
    except Exception as err:  # TVM raises its own error types for bad libraries and missing symbols
        raise KernelFileError(f"cannot load kernel {entry['key']} from {library}: {err}") from err


def _host_cpu_or_none() -> str | None:
    try:
        return host_cpu_name()
    except (LoweringError, AttributeError):  # no TVM at all, or the runtime-only TVM: no LLVM to ask
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class RowCall:
    """The row kernel on one layer's checked operands. A batch-1 call spends ~3 us of ~45 in the op's checks,
    dispatch and index-word view (3072 -> 768 at 90%); eager calls that need none of them come here: 1-2
    contiguous float32 CPU rows autograd does not track, with the very operand tensors that were checked. Anything
    else returns None, and the caller takes the full path (which raises the typed errors)."""

    handle: LlvmLinearHandle  # (its row_fn is looked up per call, as the op's launch does)
    n_in: int
    n_out: int
    values: torch.Tensor
    indices: torch.Tensor
    words: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
        if values is not self.values or indices is not self.indices or bias is not self.bias:
            return None  # (operands replaced since they were checked)
        if x.dim() != 2 or not 0 < x.shape[0] < MID_FROM or x.shape[1] != self.n_in or x.dtype != torch.float32 \
                or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or not x.is_contiguous():
            return None
        out = x.new_empty(x.shape[0], self.n_out)
        if bias is None:
            self.handle.row_fn(x, values, self.words, out)
        else:
            self.handle.row_fn(x, values, self.words, bias, out)
        return out
