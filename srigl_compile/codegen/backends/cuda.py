"""The cuda backend: NVIDIA GPUs, float32 / float16 / bfloat16, built ahead of time (no GPU needed), im2col convs.

Build (any machine with TVM and nvcc): TVM compiles a shape's kernels (``cuda_kernels`` defines them,
``cuda_rules`` schedules them: decode kernels for batch tiles of 1, 4, 8 and 16 columns that fit in shared memory,
the col kernel, the expand kernel) into one library whose device part is CUDA C; nvcc compiles that source once to
a fatbin (SASS for the target's archs + PTX). Variants and dispatch thresholds come from a record measured on a
GPU when there is one (``cuda_records.lookup``), else from the rules' defaults and ``cuda_records.model_dispatch``.
Running them is ``runtime.cuda_linear``'s job. Variants cannot be tuned here (they must be timed on a GPU:
``benchmarks/cuda_variants.py`` writes the records). Convolutions run the linear kernels on im2col rows.

Prebuilt kernels: ``$SRIGL_CUDA_KERNELS`` names a folder of ``export_kernels``; its kernels are registered before
anything is built, and a registered handle of the same build is returned as is, so a GPU machine with only the
TVM runtime lowers models whose kernels were built elsewhere.

Example:
    >>> spec = KernelSpec(768, 3072, 307, "int16", True, "float16")
    >>> handle = build_cuda(spec, {"kind": "cuda", "arch": "sm_90"})     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...errors import LoweringError, UnsupportedTargetError
from ...runtime.cuda_linear import CUDA_DTYPES, CudaLinearHandle
from ...runtime.cuda_params import CudaVariants
from ...runtime.kernel_io import load_kernels
from ...runtime.registry import get_registered, register_handle
from ...runtime.spec import KernelSpec
from .. import _tvm_compat
from ..cuda_kernels import compile_fatbin
from ..cuda_records import default_variants, lookup, model_dispatch, schedule_all
from ..tuning import default_cache_dir
from .base import Backend, TargetConfig

__all__ = ["CudaBackend", "CudaConfig", "build_cuda", "load_prebuilt_kernels", "DEFAULT_FATBIN_ARCHS",
           "PREBUILT_ENV"]

log = logging.getLogger(__name__)

DEFAULT_FATBIN_ARCHS = ("sm_80", "sm_90")  # A100 and H100/H200 machine code when no arch is given
PREBUILT_ENV = "SRIGL_CUDA_KERNELS"  # a folder of prebuilt kernels (export_kernels) that lower() uses first
_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


@dataclasses.dataclass(frozen=True)
class CudaConfig(TargetConfig):
    """``TargetConfig`` for NVIDIA GPUs: ``target`` {"kind": "cuda", "arch": "sm_90", "fatbin_archs": [...]} or
    None (this machine's GPU, else sm_80 + sm_90 + PTX); ``dtype`` float32, float16 or bfloat16 (sums in
    float32).

    Example:
        >>> lower(model, CudaConfig({"kind": "cuda", "arch": "sm_90"}, dtype=torch.float16))   # doctest: +SKIP
    """

    kind = "cuda"


class CudaBackend(Backend):
    kind = "cuda"
    description = "NVIDIA GPUs (built ahead of time with nvcc; runs where CUDA is available)"
    dtypes = tuple(CUDA_DTYPES)
    conv_route = "im2col"
    config_type = CudaConfig
    handle_types = (CudaLinearHandle,)

    def resolve_target(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        return resolve_cuda_target(given)

    def target_tag(self, target: Mapping[str, Any]) -> str:
        return cuda_target_tag(target)

    def check_options(self, options: dict[str, Any]) -> None:
        if options.get("tune"):
            raise LoweringError("tune=True is not available for target 'cuda': CUDA variants must be timed on a "
                                "GPU, so lower with tune=False (the default schedules)")

    def build(self, spec: KernelSpec, config: CudaConfig) -> CudaLinearHandle:
        return build_cuda(spec, config.target, cache_dir=config.cache_dir)

    def place(self, model: nn.Module) -> nn.Module:
        return model.cuda() if torch.cuda.is_available() else model


def resolve_cuda_target(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """This machine's GPU when there is one, else machine code for sm_80 and sm_90 plus PTX that newer GPUs
    compile when they load it; a dict names one arch, and a ``fatbin_archs`` list adds machine code for more."""
    if given is None:
        if torch.cuda.is_available():
            arch = "sm_%d%d" % torch.cuda.get_device_capability()
            return {"kind": "cuda", "arch": arch, "fatbin_archs": [arch]}
        return {"kind": "cuda", "arch": DEFAULT_FATBIN_ARCHS[0], "fatbin_archs": list(DEFAULT_FATBIN_ARCHS)}
    arch = given.get("arch")
    archs = list(given.get("fatbin_archs") or [arch])
    unknown = set(given) - {"kind", "arch", "fatbin_archs"}
    if not isinstance(arch, str) or not all(isinstance(a, str) and _ARCH.match(a) for a in [arch, *archs]):
        raise UnsupportedTargetError(f"a CUDA target needs an 'arch' such as 'sm_90' (and optional 'fatbin_archs' "
                                     f"of the same form); got {dict(given)!r}")
    if unknown:
        raise UnsupportedTargetError(f"unknown CUDA target keys {sorted(unknown)}; supported: kind, arch, "
                                     "fatbin_archs")
    return {"kind": "cuda", "arch": arch, "fatbin_archs": sorted(set([arch, *archs]))}


def cuda_target_tag(target: Mapping[str, Any]) -> str:
    return f"cuda-{target['arch']}"


def build_cuda(spec: KernelSpec, target: Mapping[str, Any] | None = None, *, cache_dir=None,
               variants: CudaVariants | None = None) -> CudaLinearHandle:
    """Compile (once per process) a shape's CUDA kernels to a fatbin and register their handle; no GPU needed.

    Args:
        spec: the layer's kernel; ``spec.dtype`` "float32", "float16" or "bfloat16" (sums are float32 in every case).
        target: {"kind": "cuda", "arch": "sm_90", "fatbin_archs": [...]}, or None (``CudaBackend.resolve_target``).
        cache_dir: where fatbins are cached and tuning records are read (default: ``tuning.default_cache_dir()``).
        variants: the schedule variants (default: the tuning record's, else ``cuda_records.default_variants``).

    Returns:
        The registered handle. A handle already registered under the same key (built, or loaded from a saved
        model or from the ``$SRIGL_CUDA_KERNELS`` folder) is returned as is: that is how a GPU machine without a
        compiler lowers with prebuilt kernels.
    """
    if spec.dtype not in CUDA_DTYPES:
        raise LoweringError(f"CUDA kernels take dtype float32, float16 or bfloat16, not {spec.dtype!r}")
    target = resolve_cuda_target(target)
    key = spec.key(cuda_target_tag(target))
    cache = Path(cache_dir or default_cache_dir())
    record = lookup(spec, target["arch"], cache)
    variants = variants or (record.variants if record else default_variants())
    load_prebuilt_kernels()
    existing = get_registered(key)
    if existing is not None and _same_build(existing, variants, record):
        return existing
    funcs = schedule_all(variants, spec, lambda layout: KernelSpec.hashed_symbol(layout, key))
    dispatch = record.dispatch if record else model_dispatch(spec.n_out, spec.n_in, spec.k_pad, spec.dtype)
    dispatch = dispatch.restricted_to(variants.decode_tiles(funcs))
    source, module = _cuda_source(funcs, key, target["arch"])
    archs = tuple(target["fatbin_archs"])  # resolve_target lists them, the arch included
    fatbin = compile_fatbin(source, archs, cache_dir=cache / "fatbins")
    handle = CudaLinearHandle(key, spec, target, archs, variants.only(funcs), dispatch, source, fatbin, module=module)
    log.info("built CUDA kernel %s (%d-byte fatbin for %s; %s)", key, len(fatbin), ", ".join(archs), dispatch)
    return register_handle(handle)


def _cuda_source(funcs: dict[str, Any], key: str, arch: str) -> tuple[str, Any]:
    """(CUDA C, host module) of one library holding ``funcs`` under their hashed symbols."""
    tvm = _tvm_compat.import_tvm()  # (looked up at call time: a test checks prebuilt kernels compile nothing)
    mod = tvm.IRModule({KernelSpec.hashed_symbol(layout, key): func for layout, func in funcs.items()})
    cuda_target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
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
    return cuda_modules[0].inspect_source(), executable.mod


def _same_build(handle: CudaLinearHandle, variants: CudaVariants, record) -> bool:
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
    _PREBUILT_LOADED.add(str(folder))
    return len(load_kernels(folder))
