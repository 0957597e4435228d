"""CUDA kernel handles: build a layer shape's kernels ahead of time, run them from torch on a GPU, by regime.

Build (any machine with TVM and nvcc, no GPU needed):
    TVM compiles the shape's kernels (``cuda_kernels`` defines them, ``cuda_rules`` schedules them: decode kernels
    for batch tiles of 1, 4, 8 and 16 columns that fit in shared memory, the col kernel, the expand kernel) into one
    library whose device part is CUDA C; nvcc compiles that source once to a fatbin (SASS for the target's archs +
    PTX). The handle keeps the source, the fatbin and the library.
Run (a machine with a GPU; the runtime-only TVM is enough):
    on first use the library is loaded with ``tvm.runtime.load_module``; TVM asks ``tvm_callback_cuda_compile`` to
    compile the CUDA source, and the callback installed here answers with the fatbin built for that exact source
    (looked up by its SHA-256), so no compiler runs on the GPU machine. Kernels launch on torch's current stream
    (tvm-ffi reads it from the torch tensors), so a lowered model captures into a CUDA graph.
Dispatch per call, by the number of rows m (``CudaDispatch``): m < col_from: decode (the smallest tile >= m, or
chunks of the largest); m < dense_from: col on x transposed; beyond: expand the condensed weights into a dense
temporary and hand the product to cuBLAS (tensor cores; the temporary comes from torch's caching allocator and
is not kept). The thresholds come from the tuning records measured on a GPU when there are any
(``cuda_records``), else from ``cuda_records.model_dispatch``.
Without CUDA, running a CUDA kernel raises ``CudaUnavailableError`` naming the fix; building still works.

Example:
    >>> h = build_cuda_condensed_linear(768, 3072, 307, "int16", True, "float16", {"kind": "cuda", "arch": "sm_90"})
    >>> values, indices = h.pack(values, indices)       # doctest: +SKIP
    >>> y = h(x.cuda().half(), values.cuda(), indices.cuda(), bias.cuda().half())   # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DeviceError, LoweringError
from .cuda_records import CudaDispatch, CudaVariants
from .kernel_op import (K_MULTIPLE, KernelDeviceError, KernelDtypeError, KernelShapeFields, check_batch_input,
                        condensed_linear, get_registered, pack_operands, register_handle)

__all__ = ["CudaKernelHandle", "CudaUnavailableError", "build_cuda_condensed_linear", "register_fatbin",
           "CUDA_DTYPES", "DEFAULT_CUDA_COL_THRESHOLD", "DEFAULT_FATBIN_ARCHS", "cuda_handle_key",
           "load_prebuilt_kernels", "PREBUILT_ENV"]

log = logging.getLogger(__name__)

CUDA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CUDA_COL_THRESHOLD = 0  # 0: each handle's own dispatch (CudaDispatch); > 0 forces the col kernel from there
DEFAULT_FATBIN_ARCHS = ("sm_80", "sm_90")  # A100 and H100/H200 machine code when no arch is given
MAX_GRID_Y = 65535  # the col kernel puts row blocks on blockIdx.y
PREBUILT_ENV = "SRIGL_CUDA_KERNELS"  # a folder of prebuilt kernels (export_kernels) that lower() uses first


class CudaUnavailableError(DeviceError, RuntimeError):
    """A CUDA-lowered model was run where there is no CUDA device (or no TVM CUDA runtime)."""


def cuda_handle_key(n_out, n_in, k, index_dtype, has_bias, dtype, target: Mapping[str, Any]) -> str:
    return f"o{n_out}_i{n_in}_k{k}_{index_dtype}_{'b' if has_bias else 'nb'}_{dtype}@cuda-{target['arch']}"


def _symbol(layout: str, key: str) -> str:
    return f"srigl_cuda_{layout}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclasses.dataclass(eq=False)
class CudaKernelHandle(KernelShapeFields):
    """A shape's CUDA kernels (decode tiles, col, expand); call it like the op (``h(x, values, indices, bias)``).

    Attributes:
        key: registry key; n_out, n_in, k, k_pad, index_dtype, has_bias: as for the CPU ``KernelHandle``.
        dtype: "float32", "float16" or "bfloat16" (inputs, weights and output; sums in float32).
        target: {"kind": "cuda", "arch": ...}; fatbin_archs: the archs the fatbin holds machine code for.
        variants: the schedule variants (``CudaVariants``); dispatch: which kernel runs at which batch.
        source: the CUDA C; fatbin: nvcc's output for it.
        module: the built library (None when loaded from disk); library_path: the exported library file, if any.
    """

    dtype: str
    target: dict[str, Any]
    fatbin_archs: tuple[str, ...]
    variants: CudaVariants
    dispatch: CudaDispatch
    source: str
    fatbin: bytes
    module: Any = None
    library_path: str | None = None
    device_type = "cuda"
    _functions: Any = dataclasses.field(default=None, init=False, repr=False)

    def pack(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel operands (this handle's dtype, index dtype, k padded to ``k_pad``), on the tensors' device."""
        return pack_operands(self, values, indices, CUDA_DTYPES[self.dtype])

    def __call__(self, x, values, indices, bias=None, col_threshold: int = DEFAULT_CUDA_COL_THRESHOLD):
        return condensed_linear(x, values, indices, bias, self.key, col_threshold)

    def check_input(self, x: torch.Tensor) -> None:
        if not x.is_cuda:
            _require_cuda(self)
            raise KernelDeviceError(f"kernel {self.key} runs on a CUDA GPU but got a tensor on {x.device}; move "
                                    "the model and its input with .cuda()")
        if x.dtype != CUDA_DTYPES[self.dtype]:
            raise KernelDtypeError(f"kernel {self.key} takes {self.dtype} inputs, got {x.dtype}; convert the input "
                                   f"with .to(torch.{self.dtype})")
        check_batch_input(x, self)

    def regime(self, m: int, col_threshold: int = DEFAULT_CUDA_COL_THRESHOLD) -> str:
        """"decode", "col" or "dense": the kernel that runs for a batch of ``m`` rows."""
        dispatch = self.dispatch if col_threshold <= 0 else dataclasses.replace(self.dispatch, col_from=col_threshold)
        return dispatch.regime(m, -(-self.n_out // self.variants.col.rows) <= MAX_GRID_Y)

    def launch(self, rows: torch.Tensor, operands: list[torch.Tensor], col_threshold: int) -> torch.Tensor:
        """y [m, n_out] for rows [m, n_in] (contiguous)."""
        if operands[0].device != rows.device:
            raise KernelDeviceError(f"kernel {self.key}: the layer's weights are on {operands[0].device} and the "
                                    f"input on {rows.device}; move the model with .to({str(rows.device)!r})")
        functions = self.functions()
        m = rows.shape[0]
        regime = self.regime(m, col_threshold)
        with torch.cuda.device(rows.device):
            if regime == "decode":
                out = rows.new_empty(m, self.n_out)
                tile = self.dispatch.decode_tile(m)
                decode = functions["decode"][tile]
                for start in range(0, m, tile):  # one launch unless m exceeds the largest tile
                    stop = min(m, start + tile)
                    decode(rows[start:stop], *operands, out[start:stop])
                return out
            if regime == "col":
                yt = rows.new_empty(self.n_out, m)
                functions["col"](rows.t().contiguous(), *operands, yt)
                return yt.t().contiguous()
            values, indices, *bias = operands
            dense = rows.new_empty(self.n_out, self.n_in)  # a temporary: no dense copy is kept
            functions["expand"](values, indices, dense)
            return F.linear(rows, dense, *bias)

    def functions(self) -> dict[str, Any]:
        """{"decode": {tile: fn}, "col": fn, "expand": fn}, loading the library into the CUDA runtime on first use."""
        if self._functions is None:
            self._functions = _load_functions(self)
        return self._functions


# The fatbin built for each CUDA source, by SHA-256 of the source: what tvm_callback_cuda_compile answers with.
_FATBINS: dict[str, bytes] = {}


def _source_digest(source: str | bytes) -> str:
    return hashlib.sha256(source.encode() if isinstance(source, str) else bytes(source)).hexdigest()


def register_fatbin(source: str, fatbin: bytes) -> None:
    """Make ``fatbin`` the compiled form of ``source`` for TVM's CUDA loader in this process."""
    _FATBINS[_source_digest(source)] = fatbin
    _install_compile_callback()


def _install_compile_callback() -> None:
    import tvm_ffi

    def tvm_callback_cuda_compile(code, *_):
        fatbin = _FATBINS.get(_source_digest(code))
        if fatbin is None:  # not one of ours: a compiler is needed after all
            raise LoweringError("no prebuilt fatbin for this CUDA source; build the kernels with "
                                "srigl_compile.lower(..., target='cuda') on a machine with nvcc")
        return fatbin

    # Registered again on every call: importing tvm.contrib.nvcc in between would have replaced it.
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", tvm_callback_cuda_compile, override=True)


def _ensure_cuda_runtime(tvm) -> None:
    """Load TVM's CUDA runtime library (the runtime-only package does not load it by itself)."""
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    lib = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # after torch, which brought libcudart
    except OSError as err:
        raise CudaUnavailableError(f"TVM's CUDA runtime ({lib}) cannot be loaded: {err}") from err


def _require_cuda(handle: CudaKernelHandle) -> None:
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"kernel {handle.key} was lowered for CUDA ({handle.target['arch']}), but this machine has no usable "
            "CUDA device (torch.cuda.is_available() is False): run the model on a GPU machine, or lower it again "
            "with target='llvm' to run it on this CPU")


def _load_functions(handle: CudaKernelHandle):
    _require_cuda(handle)
    from ._tvm_compat import import_tvm_runtime

    tvm = import_tvm_runtime()
    _ensure_cuda_runtime(tvm)
    register_fatbin(handle.source, handle.fatbin)
    path = handle.library_path
    if path is None:  # built in this process: the CUDA module is loaded through a library file
        path = str(Path(tempfile.mkdtemp(prefix="srigl_cuda_")) / f"{_symbol('lib', handle.key)}.so")
        handle.module.export_library(path)
        handle.library_path = path
    try:
        module = tvm.runtime.load_module(path)
        return {"decode": {tile: module[_symbol(f"decode{tile}", handle.key)] for tile, _ in handle.variants.decode},
                "col": module[_symbol("col", handle.key)], "expand": module[_symbol("expand", handle.key)]}
    except Exception as err:  # TVM's own error types: a driver too old for the fatbin, an arch it lacks, ...
        capability = "sm_%d%d" % torch.cuda.get_device_capability()
        raise CudaUnavailableError(f"cannot load CUDA kernel {handle.key} (fatbin for {handle.fatbin_archs}, this "
                                   f"GPU is {capability}): {err}") from err


def build_cuda_condensed_linear(n_out: int, n_in: int, k: int, index_dtype: str = "int32", has_bias: bool = True,
                                dtype: str = "float32", target: Mapping[str, Any] | None = None, *,
                                cache_dir=None, variants: CudaVariants | None = None) -> CudaKernelHandle:
    """Compile (once per process) a shape's CUDA kernels to a fatbin and register their handle; no GPU needed.

    Args:
        n_out, n_in, k, index_dtype, has_bias: as for ``build_condensed_linear``.
        dtype: "float32", "float16" or "bfloat16" (sums are float32 in every case).
        target: {"kind": "cuda", "arch": "sm_90", "fatbin_archs": [...]} (``target.resolve_target("cuda")``).
        cache_dir: where fatbins are cached and tuning records are read (default: ``tuning.default_cache_dir()``).
        variants: the schedule variants (default: the tuning record's, else ``CudaVariants.default``).

    Returns:
        The registered handle. A handle already registered under the same key (built, or loaded from a saved
        model or from the ``$SRIGL_CUDA_KERNELS`` folder) is returned as is: that is how a GPU machine without a
        compiler lowers with prebuilt kernels.
    """
    from .target import resolve_target

    if dtype not in CUDA_DTYPES:
        raise LoweringError(f"CUDA kernels take dtype float32, float16 or bfloat16, not {dtype!r}")
    target = resolve_target(dict(target) if target is not None else "cuda")
    k_pad = -(-k // K_MULTIPLE) * K_MULTIPLE
    key = cuda_handle_key(n_out, n_in, k, index_dtype, has_bias, dtype, target)
    from .cuda_records import lookup, model_dispatch
    from .tuning import default_cache_dir

    cache = Path(cache_dir or default_cache_dir())
    record = lookup(n_out, n_in, k_pad, dtype, target["arch"], cache)
    variants = variants or (record.variants if record else CudaVariants.default())
    load_prebuilt_kernels()
    existing = get_registered(key)
    if existing is not None and _same_build(existing, variants, record):
        return existing
    from ._tvm_compat import import_tvm
    from .cuda_kernels import compile_fatbin

    tvm = import_tvm()
    funcs = variants.schedule_all(n_out, n_in, k_pad, k, index_dtype, dtype, has_bias,
                                  lambda layout: _symbol(layout, key))
    dispatch = (record.dispatch if record else model_dispatch(n_out, n_in, k_pad, dtype))
    dispatch = dispatch.restricted_to(variants.decode_tiles(funcs))
    mod = tvm.IRModule({_symbol(layout, key): func for layout, func in funcs.items()})
    cuda_target = tvm.target.Target({"kind": "cuda", "arch": target["arch"]}, host={"kind": "llvm"})
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"  # keep the CUDA source even where a CUDA runtime is present
    try:
        executable = tvm.compile(mod, target=cuda_target)
    finally:
        if previous is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK")
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous
    cuda_modules = [m for m in executable.mod.imports if m.kind == "cuda"]
    if len(cuda_modules) != 1:
        raise LoweringError(f"TVM built {len(cuda_modules)} CUDA modules for kernel {key}, expected 1")
    source = cuda_modules[0].inspect_source()
    archs = tuple(target["fatbin_archs"])  # resolve_target lists them, the arch included
    fatbin = compile_fatbin(source, archs, cache_dir=cache / "fatbins")
    handle = CudaKernelHandle(key, n_out, n_in, k, k_pad, index_dtype, has_bias, dtype, target, archs,
                              variants.only(funcs), dispatch, source, fatbin, module=executable.mod)
    log.info("built CUDA kernel %s (%d-byte fatbin for %s; %s)", key, len(fatbin), ", ".join(archs), dispatch)
    return register_handle(handle)


def _same_build(handle: CudaKernelHandle, variants: CudaVariants, record) -> bool:
    """A registered handle serves this build: the same schedules (less the decode tiles its rules declined) and,
    when a record exists, the record's dispatch."""
    same_variants = handle.variants.col == variants.col and set(handle.variants.decode) <= set(variants.decode)
    return same_variants and (record is None or handle.dispatch.source == record.dispatch.source)


_PREBUILT_LOADED: set[str] = set()


def load_prebuilt_kernels(folder: str | os.PathLike | None = None) -> int:
    """Register the kernels of a prebuilt folder (``export_kernels``; default ``$SRIGL_CUDA_KERNELS``) once per
    process, so that lower(target="cuda") on a machine with only the TVM runtime finds them instead of compiling.
    Returns how many were registered by this call."""
    folder = folder or os.environ.get(PREBUILT_ENV)
    if not folder or str(folder) in _PREBUILT_LOADED:
        return 0
    from .kernel_io import load_kernels

    _PREBUILT_LOADED.add(str(folder))
    return len(load_kernels(folder))
