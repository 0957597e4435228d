"""Lowering backends, one per target kind (``base.Backend`` says what each decides); ``BACKENDS`` picks one.

    base.py   Backend (target dicts, dtypes, tuning, conv route, build) and TargetConfig
    llvm.py   LlvmBackend / LlvmConfig: CPUs through LLVM (direct convolutions, tuning on this machine)
    cuda.py   CudaBackend / CudaConfig: NVIDIA GPUs, built ahead of time to fatbins (im2col convolutions)

A new target is a new module here with a ``Backend`` subclass, listed in ``BACKENDS`` (and, if its kernels launch
differently from the existing handles, a run-time handle in ``runtime/`` listed in ``kernel_io.HANDLE_TYPES``).
"""

from __future__ import annotations

from .base import Backend, TargetConfig
from .cuda import CudaBackend, CudaConfig
from .llvm import LlvmBackend, LlvmConfig

__all__ = ["BACKENDS", "Backend", "TargetConfig", "LlvmConfig", "CudaConfig"]

BACKENDS: dict[str, Backend] = {backend.kind: backend for backend in (LlvmBackend(), CudaBackend())}
