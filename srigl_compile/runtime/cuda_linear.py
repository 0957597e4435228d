"""CUDA kernel handles at run time: a shape's kernels loaded from their prebuilt fatbin, run from torch by regime.

On first use the library is loaded with ``tvm.runtime.load_module``; TVM asks ``tvm_callback_cuda_compile`` to
compile the CUDA source, and the callback installed here answers with the fatbin built for that exact source
(looked up by its SHA-256), so no compiler runs on the GPU machine. Kernels launch on torch's current stream
(tvm-ffi reads it from the torch tensors), so a lowered model captures into a CUDA graph.

Dispatch per call, by the number of rows m (``CudaDispatch``): m < col_from: decode (the smallest tile >= m, or
chunks of the largest); m < dense_from: col on x transposed; beyond: expand the condensed weights into a dense
temporary and hand the product to cuBLAS (tensor cores; the temporary comes from torch's caching allocator and
is not kept). Without CUDA, running a CUDA kernel raises ``CudaUnavailableError`` naming the fix. Building the
kernels is ``codegen.backends.cuda``'s job.

Example:
    >>> h = get_handle(layer.kernel_key)                                             # doctest: +SKIP
    >>> y = h(x.cuda().half(), *h.pack(values, indices), bias.cuda().half())         # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import DeviceError, LoweringError
from .checks import KernelDeviceError, KernelDtypeError, check_batch_input
from .cuda_params import CudaDispatch, CudaVariants
from .handle import LinearHandleBase
from .kernel_files import KernelFileError, checked_file, sha256
from .spec import TORCH_FLOAT, KernelSpec
from .tvm_runtime import import_tvm_runtime

__all__ = ["CudaLinearHandle", "CudaUnavailableError", "register_fatbin", "ensure_cuda_runtime", "CUDA_DTYPES",
           "MAX_GRID_Y"]

CUDA_DTYPES = {name: TORCH_FLOAT[name] for name in ("float32", "float16", "bfloat16")}
MAX_GRID_Y = 65535  # the col kernel puts row blocks on blockIdx.y


class CudaUnavailableError(DeviceError, RuntimeError):
    """A CUDA-lowered model was run where there is no CUDA device (or no TVM CUDA runtime)."""


@dataclasses.dataclass(eq=False)
class CudaLinearHandle(LinearHandleBase):
    """A shape's CUDA kernels (decode tiles, col, expand); call it like the op (``h(x, values, indices, bias)``).

    Attributes:
        dtype: "float32", "float16" or "bfloat16" (inputs, weights and output; sums in float32).
        target: {"kind": "cuda", "arch": ...}; fatbin_archs: the archs the fatbin holds machine code for.
        variants: the schedule variants (``CudaVariants``); dispatch: which kernel runs at which batch.
        source: the CUDA C; fatbin: nvcc's output for it.
        module: the built library (None when loaded from disk); library_path: the exported library file, if any.
    """

    fatbin_archs: tuple[str, ...]
    variants: CudaVariants
    dispatch: CudaDispatch
    source: str
    fatbin: bytes
    module: Any = None
    library_path: str | None = None
    device_type: ClassVar[str] = "cuda"
    _functions: Any = dataclasses.field(default=None, init=False, repr=False)

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    def check_input(self, x: torch.Tensor) -> None:
        if not x.is_cuda:
            _require_cuda(self)
            raise KernelDeviceError(f"kernel {self.key} runs on a CUDA GPU but got a tensor on {x.device}; move "
                                    "the model and its input with .cuda()")
        if x.dtype != CUDA_DTYPES[self.dtype]:
            raise KernelDtypeError(f"kernel {self.key} takes {self.dtype} inputs, got {x.dtype}; convert the input "
                                   f"with .to(torch.{self.dtype})")
        check_batch_input(x, self)

    def regime(self, m: int, col_threshold: int = 0) -> str:
        """"decode", "col" or "dense": the kernel that runs for a batch of ``m`` rows (``col_threshold`` > 0
        forces the col kernel from there)."""
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

    def variant(self) -> tuple:
        return self.variants, self.dispatch, self.fatbin_archs

    def manifest_entry(self, folder: Path, stem: str) -> dict[str, Any]:
        """Writes the CUDA source (``stem.cu``) and its fatbin (``stem.fatbin``) beside the library."""
        (folder / f"{stem}.cu").write_text(self.source)
        (folder / f"{stem}.fatbin").write_bytes(self.fatbin)
        return {"variants": self.variants.to_dict(), "dispatch": self.dispatch.to_dict(), "dtype": self.dtype,
                "fatbin_archs": self.fatbin_archs, "source": f"{stem}.cu",
                "source_sha256": sha256(folder / f"{stem}.cu"), "fatbin": f"{stem}.fatbin",
                "fatbin_sha256": sha256(folder / f"{stem}.fatbin")}

    @classmethod
    def from_manifest(cls, folder: Path, entry: dict[str, Any], spec: KernelSpec, library: Path):
        """A handle whose library is loaded on first use (on a GPU), with its checked source and fatbin."""
        if "variants" not in entry:  # (the single row / col kernels of earlier versions)
            raise KernelFileError(f"CUDA kernel {entry['key']} in {folder} was saved by an earlier srigl_compile "
                                  "(one row and one col kernel, no dispatch): lower the model again and save it")
        source = checked_file(folder, entry["source"], entry["source_sha256"]).read_text()
        fatbin = checked_file(folder, entry["fatbin"], entry["fatbin_sha256"]).read_bytes()
        return cls(entry["key"], spec, entry["target"], tuple(entry["fatbin_archs"]),
                   CudaVariants.from_dict(entry["variants"]), CudaDispatch.from_dict(entry["dispatch"]), source,
                   fatbin, library_path=str(library))


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


def ensure_cuda_runtime(tvm) -> None:
    """Load TVM's CUDA runtime library (the runtime-only package does not load it by itself)."""
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    lib = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # after torch, which brought libcudart
    except OSError as err:
        raise CudaUnavailableError(f"TVM's CUDA runtime ({lib}) cannot be loaded: {err}") from err


def _require_cuda(handle: CudaLinearHandle) -> None:
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"kernel {handle.key} was lowered for CUDA ({handle.target['arch']}), but this machine has no usable "
            "CUDA device (torch.cuda.is_available() is False): run the model on a GPU machine, or lower it again "
            "with target='llvm' to run it on this CPU")


def _load_functions(handle: CudaLinearHandle):
    _require_cuda(handle)
    tvm = import_tvm_runtime()
    ensure_cuda_runtime(tvm)
    register_fatbin(handle.source, handle.fatbin)
    path = handle.library_path
    symbol = lambda layout: KernelSpec.hashed_symbol(layout, handle.key)  # noqa: E731
    if path is None:  # built in this process: the CUDA module is loaded through a library file
        path = str(Path(tempfile.mkdtemp(prefix="srigl_cuda_")) / f"{symbol('lib')}.so")
        handle.module.export_library(path)
        handle.library_path = path
    try:
        module = tvm.runtime.load_module(path)
        return {"decode": {tile: module[symbol(f"decode{tile}")] for tile, _ in handle.variants.decode},
                "col": module[symbol("col")], "expand": module[symbol("expand")]}
    except Exception as err:  # TVM's own error types: a driver too old for the fatbin, an arch it lacks, ...
        capability = "sm_%d%d" % torch.cuda.get_device_capability()
        raise CudaUnavailableError(f"cannot load CUDA kernel {handle.key} (fatbin for {handle.fatbin_archs}, this "
                                   f"GPU is {capability}): {err}") from err
