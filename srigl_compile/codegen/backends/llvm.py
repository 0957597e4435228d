"""The llvm backend: x86 / ARM CPUs through LLVM, float32, tuned per shape on this machine, direct convolutions.

Linear layers get a library of row, mid, col, fused and pack kernels (``tuning.compile_kernels``; which runs for a
batch is the handle's dispatch, ``runtime.llvm_linear``); convolutions the offset kernel reading the padded input
(``tuning.compile_offset_kernel``; no im2col), with a tile width that divides the output grid when ``lower`` knows
the image size (``KernelSpec.lanes``). Variants come from the tuning records, from a search (``tune=True``), or
from the rules' defaults.

Example:
    >>> handle = build_condensed_linear(768, 3072, 307, "int16", True)       # doctest: +SKIP
    >>> y = handle(x, *handle.pack(values, indices), bias)                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import LoweringError
from ...runtime.conv_geometry import VECTOR, aligned_plane, exact_tile
from ...runtime.cpu_features import cpu_features
from ...runtime.llvm_conv import LlvmConvHandle
from ...runtime.llvm_linear import LlvmLinearHandle
from ...runtime.registry import register_handle, variant_key
from ...runtime.spec import KernelSpec, target_key
from ..cpu_target import check_llvm_target
from ..rules import offset_share
from ..tuning import compile_kernels, compile_offset_kernel, select_params
from .base import Backend, TargetConfig

__all__ = ["LlvmBackend", "LlvmConfig", "build_linear", "build_conv", "build_condensed_linear",
           "build_condensed_conv", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float32, torch.bfloat16)  # what the CPU kernels' values may be stored as


@dataclasses.dataclass(frozen=True)
class LlvmConfig(TargetConfig):
    """``TargetConfig`` plus tuning: ``tune`` searches schedule variants per layer shape on this machine (records
    kept under ``cache_dir``, so a shape is tuned once); ``progress`` shows a progress bar meanwhile.
    ``value_dtype=torch.bfloat16`` stores the condensed values as bfloat16 (half their bytes; inputs, outputs,
    biases and the sums stay float32, the model's dtype): the kernels widen each value as they read it.
    ``dense_fallback`` (default on): a near-dense layer also keeps its dense form, and at each input shape runs
    whichever of the two measured faster on its first call there (``nn.dense_fallback``); off, every layer runs
    its kernel (outputs then never depend on timings).

    Example:
        >>> lower(model, LlvmConfig(tune=True))                          # doctest: +SKIP
        >>> lower(model, LlvmConfig(value_dtype=torch.bfloat16))         # doctest: +SKIP
    """

    tune: bool = False
    progress: bool = True
    value_dtype: torch.dtype = torch.float32
    dense_fallback: bool = True
    kind = "llvm"


class LlvmBackend(Backend):
    kind = "llvm"
    description = "x86 / ARM CPUs through LLVM (host CPU detected)"
    dtypes = ("float32",)
    conv_route = "direct"
    epilogues = {"linear": frozenset({"relu", "add", "add_relu", "gelu", "silu"}),
                 "conv": frozenset({"relu", "add", "add_relu", "gelu", "silu"})}
    config_type = LlvmConfig
    handle_types = (LlvmLinearHandle, LlvmConvHandle)

    def resolve_target(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        return check_llvm_target(given)  # (None: the host CPU, detected and named)

    def target_tag(self, target: Mapping[str, Any]) -> str:
        return target_key(target)

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype in (torch.bfloat16, torch.float16):
            raise LoweringError(f"target 'llvm' lowers float32 models, not {dtype}; for bfloat16 condensed values "
                                "(float32 activations) lower with LlvmConfig(value_dtype=torch.bfloat16)")
        super().check_dtype(dtype)

    def checked(self, config: LlvmConfig) -> LlvmConfig:
        config = super().checked(config)
        if config.value_dtype not in VALUE_DTYPES:
            raise LoweringError(f"LlvmConfig.value_dtype={config.value_dtype}: choose one of {VALUE_DTYPES}")
        return config

    def spec_dtype(self, config: LlvmConfig) -> str | None:
        """The values' dtype when not float32 (then part of each kernel's key and symbol)."""
        value_dtype = getattr(config, "value_dtype", torch.float32)
        return None if value_dtype == torch.float32 else str(value_dtype).removeprefix("torch.")

    def conv_tile(self, spec: KernelSpec, positions: int, config: LlvmConfig) -> int | None:
        """With AVX-512, tiles of whole 16-lane vectors up to 13 of them (``rin`` = 2 rows: 26 of the 32
        accumulator registers); 64 lanes at most for near-dense layers, whose shared offsets interleave 4 rows. A
        grid of that size at most that is not whole vectors (14x14, 7x7) is one tile of whole vectors over planar
        images (``conv_geometry``: channels on cache-line boundaries; the tail lanes computed for nothing): 1.26-1.33x
        faster a call than the exact tile's split loads and scalar lanes (196 and 49 lanes). Else (AVX2) 8-lane
        vectors, 64 lanes at most."""
        if "avx512f" not in cpu_features(config.target):
            return exact_tile(positions)
        widest = 64 if shared_rows(spec, config.target, 64) > 1 else 13 * 16
        if positions % VECTOR and positions <= widest:
            return aligned_plane(positions)
        return exact_tile(positions, vector=16, widest=widest)

    def build(self, spec: KernelSpec, config: LlvmConfig):
        options = dict(tune=config.tune, cache_dir=config.cache_dir, progress=config.tune and config.progress)
        build = build_conv if spec.op == "conv" else build_linear
        return build(spec, config.target, **options)


def build_linear(spec: KernelSpec, target: Mapping[str, Any] | None = None, *, tune: bool = False,
                 cache_dir=None, progress: bool | None = None) -> LlvmLinearHandle:
    """Compile (once per process) the kernels of a condensed linear layer and register their handle.

    Args:
        spec: the layer's kernel (any k >= 1; kernels use ``spec.k_pad``; int16 indices need n_in <= 32768).
        target: llvm target dict; None detects the host CPU (``cpu_target.host_llvm_target``).
        tune: time each rule's variants for this shape and keep the fastest in the tuning records (a shape is
            tuned once per cache_dir); False uses a stored record if any, else the default variants.
        cache_dir: tuning-record folder (default ``$SRIGL_COMPILE_CACHE`` or ``~/.cache/srigl_compile/tuning``).

    Returns:
        The registered handle; pass ``handle.key`` to the op.
    """
    target = check_llvm_target(target)
    key = spec.key(target_key(target))
    params = {layout: select_params(spec, layout, target, tune=tune, cache_dir=cache_dir, progress=progress)
              for layout in ("row", "col")}
    key, existing = variant_key(key, lambda handle: (handle.row_params, handle.col_params) ==
                                 (params["row"], params["col"]))
    if existing is not None:
        return existing
    executable = compile_kernels(spec, params["row"], params["col"], target)
    return register_handle(LlvmLinearHandle(key, spec, target, params["row"], params["col"], executable.mod))


def build_conv(spec: KernelSpec, target: Mapping[str, Any] | None = None, *, tune: bool = False, cache_dir=None,
               progress: bool | None = None) -> LlvmConvHandle:
    """Compile (once per process) the offset kernel of a condensed convolution and register its handle.

    ``spec.n_in`` is the im2col width C * kh * kw (the columns must lie below it); its index dtype is that of the
    stored columns (the kernel itself reads int32 offsets); ``spec.lanes`` (output positions per tile) overrides
    the chosen variant's (``conv_geometry.exact_tile``: a width that divides a 1x1 layer's grid needs no padding
    or crop). Tuning times the kernel on 14x14 images.
    """
    target = check_llvm_target(target)
    key = spec.key(target_key(target))
    params = select_params(spec, "offset", target, tune=tune, cache_dir=cache_dir, progress=progress)
    if spec.lanes:
        params = dataclasses.replace(params, lanes=spec.lanes)
    if (share := shared_rows(spec, target, params.lanes)) > 1 and params.rows % share == 0:
        params = dataclasses.replace(params, share=share, rin=share)
    key, existing = variant_key(key, lambda handle: handle.params == params)
    if existing is not None:
        return existing
    executable = compile_offset_kernel(spec, params, target)
    return register_handle(LlvmConvHandle(key, spec, target, params, executable.mod))


def shared_rows(spec: KernelSpec, target: Mapping[str, Any], lanes: int) -> int:
    """Rows sharing one offset list in a convolution kernel of ``lanes`` lanes on ``target``: ``offset_share``'s
    choice for a near-dense layer where AVX-512's 32 registers hold its share x lanes / 16 accumulators (measured
    there only: AVX2's 16 registers would spill), else 1."""
    share = offset_share(spec.n_in, spec.k)
    fits = "avx512f" in cpu_features(target) and share * -(-lanes // 16) <= 16
    return share if share > 1 and fits else 1


def build_condensed_linear(n_out: int, n_in: int, k: int, index_dtype: str = "int32", has_bias: bool = True,
                           target: Mapping[str, Any] | None = None, **options) -> LlvmLinearHandle:
    """``build_linear`` of ``KernelSpec(n_out, n_in, k, index_dtype, has_bias)`` (options: tune, cache_dir,
    progress)."""
    return build_linear(KernelSpec(n_out, n_in, k, index_dtype, has_bias), target, **options)


def build_condensed_conv(n_out: int, n_in: int, k: int, index_dtype: str = "int32", has_bias: bool = True,
                         target: Mapping[str, Any] | None = None, *, lanes: int | None = None,
                         **options) -> LlvmConvHandle:
    """``build_conv`` of a convolution's ``KernelSpec`` (n_in: the im2col width; lanes: its tile width)."""
    return build_conv(KernelSpec(n_out, n_in, k, index_dtype, has_bias, op="conv", lanes=lanes), target, **options)
