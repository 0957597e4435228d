"""Choosing what a CUDA layer shape compiles (``CudaVariants``) and which kernel runs at which batch
(``CudaDispatch``; both types are in ``runtime.cuda_params``, which handles record them in).

Both come from a tuning record when one was measured on a GPU for the shape (``lookup``: JSON files under
``<cache>/cuda/<arch>/``, written by ``write_record`` from ``benchmarks/cuda_variants.py``; else the records
shipped in ``codegen/cuda_measured/<arch>/``, each naming the GPU, commit and command it came from), else from
defaults:
``default_variants()`` and ``model_dispatch``, a cost model of the three regimes. The cost model's constants
are estimates from ../shared/GPU.md (H200), not measurements of these kernels: replace them by records.

Example:
    >>> model_dispatch(768, 3072, 312, "float16").regime(1)
    'decode'
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..runtime.cuda_params import CudaDispatch, CudaVariants, DecodeParams
from ..runtime.spec import KernelSpec
from .cuda_kernels import col_func, decode_func, expand_func
from .cuda_rules import ColRule, DecodeRule, decode_fits, expand_rows

__all__ = ["CudaRecord", "default_variants", "schedule_all", "model_dispatch", "lookup", "write_record",
           "DECODE_TILES"]

DECODE_TILES = (1, 4, 8, 16)  # batch columns of the decode kernels a shape compiles (those that fit)


def default_variants() -> CudaVariants:
    """The rules' defaults (unmeasured; records replace them)."""
    return CudaVariants(tuple((t, DecodeRule().default(t)) for t in DECODE_TILES), ColRule().default())


def schedule_all(variants: CudaVariants, spec: KernelSpec, symbol) -> dict[str, Any]:
    """{layout: scheduled PrimFunc named symbol(layout)} for ``spec``'s padded shape; decode tiles whose rule
    declines are left out."""
    n_out, n_in, k_pad, index, dtype = spec.n_out, spec.n_in, spec.k_pad, spec.index_dtype, spec.dtype
    funcs = {}
    for tile, params in variants.decode:
        func = decode_func(n_out, n_in, k_pad, index, dtype, tile=tile, has_bias=spec.has_bias,
                           symbol=symbol(f"decode{tile}"))
        sch = DecodeRule().apply(func, params)
        if sch is not None:
            funcs[f"decode{tile}"] = sch.mod["main"]
    col = ColRule().apply(col_func(n_out, n_in, k_pad, index, dtype, has_bias=spec.has_bias, symbol=symbol("col")),
                          variants.col)
    funcs["col"] = col.mod["main"]
    funcs["expand"] = expand_func(n_out, n_in, k_pad, spec.k, index, dtype, rows=expand_rows(n_in, dtype),
                                  symbol=symbol("expand"))
    return funcs


@dataclasses.dataclass(frozen=True)
class CudaRecord:
    variants: CudaVariants
    dispatch: CudaDispatch


# Cost model (microseconds), H200-class estimates (GPU.md): the col kernel's useful products per second, tensor-core
# and fp32 dense FLOP/s, HBM bytes per second, and a kernel's fixed cost inside a CUDA graph.
COL_PRODUCTS_PER_S = 2.0e12
DENSE_FLOPS = {"float16": 500e12, "bfloat16": 500e12, "float32": 40e12}
HBM_BYTES_PER_S = 3.0e12
LAUNCH_US = 3.0
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_dispatch(n_out: int, n_in: int, k_pad: int, dtype: str) -> CudaDispatch:
    """Thresholds from the cost model: decode up to two launches of the largest tile that fits in shared memory;
    expand + cuBLAS from the first batch (powers of two) where it is estimated faster than the col kernel."""
    tiles = tuple(t for t in DECODE_TILES if decode_fits(n_in, t, dtype, DecodeParams()))
    weight_bytes = n_out * n_in * _BYTES[dtype]

    def col_us(batch: int) -> float:
        return batch * n_out * k_pad / COL_PRODUCTS_PER_S * 1e6 + LAUNCH_US

    def dense_us(batch: int) -> float:  # expand (write + read the temporary) + the GEMM
        gemm = max(2 * batch * n_out * n_in / DENSE_FLOPS[dtype], weight_bytes / HBM_BYTES_PER_S)
        return (gemm + 2 * weight_bytes / HBM_BYTES_PER_S) * 1e6 + 2 * LAUNCH_US

    dense_from = next((b for b in (2 ** p for p in range(4, 17)) if dense_us(b) < col_us(b)), 0)
    return CudaDispatch(tiles, 2 * tiles[-1] + 1 if tiles else 1, dense_from, "model")


SHIPPED = Path(__file__).resolve().parent / "cuda_measured"  # records measured on lent GPUs, shipped with the code


def _record_path(cache: Path, spec: KernelSpec, arch: str) -> Path:
    return Path(cache) / "cuda" / arch / f"{spec.measured_record_name()}.json"


def lookup(spec: KernelSpec, arch: str, cache: Path) -> CudaRecord | None:
    """The measured record of a shape (its padded shape and dtype): the user's own (``cache``) first, else a
    shipped one, else None (a corrupt record is ignored: the defaults are always valid)."""
    for path in (_record_path(cache, spec, arch), SHIPPED / arch / f"{spec.measured_record_name()}.json"):
        try:
            data = json.loads(path.read_text())
            return CudaRecord(CudaVariants.from_dict(data["variants"]), CudaDispatch.from_dict(data["dispatch"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def write_record(cache: Path, spec: KernelSpec, arch: str, record: CudaRecord, evidence: dict[str, Any]) -> Path:
    path = _record_path(cache, spec, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"variants": record.variants.to_dict(), "dispatch": record.dispatch.to_dict(),
                                "evidence": evidence}, indent=1))
    return path
