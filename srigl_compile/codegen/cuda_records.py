"""What a CUDA layer shape compiles (``CudaVariants``) and which kernel runs at which batch (``CudaDispatch``).

Both come from a tuning record when one was measured on a GPU for the shape (``lookup``: JSON files under
``<cache>/cuda/<arch>/``, written by ``write_record`` from ``benchmarks/cuda_variants.py``), else from defaults:
``CudaVariants.default()`` and ``model_dispatch``, a cost model of the three regimes. The cost model's constants
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

from .cuda_rules import ColParams, DecodeParams, decode_fits, expand_rows

__all__ = ["CudaVariants", "CudaDispatch", "CudaRecord", "model_dispatch", "lookup", "write_record",
           "DECODE_TILES"]

DECODE_TILES = (1, 4, 8, 16)  # batch columns of the decode kernels a shape compiles (those that fit)


@dataclasses.dataclass(frozen=True)
class CudaDispatch:
    """tiles: the decode tiles compiled (ascending); batches below ``col_from`` run decode (chunks of the largest
    tile past it), from ``dense_from`` (0: never) expand + cuBLAS, col in between. ``source``: "model" or the GPU
    the thresholds were measured on."""

    tiles: tuple[int, ...]
    col_from: int
    dense_from: int
    source: str = "model"

    def regime(self, m: int, col_fits: bool = True) -> str:
        if self.tiles and m < self.col_from:
            return "decode"
        if (self.dense_from and m >= self.dense_from) or not col_fits:
            return "dense"
        return "col"

    def decode_tile(self, m: int) -> int:
        return next((t for t in self.tiles if t >= m), self.tiles[-1])

    def restricted_to(self, tiles: tuple[int, ...]) -> CudaDispatch:
        """This dispatch with only ``tiles`` compiled: at most two decode launches a call."""
        col_from = min(self.col_from, 2 * tiles[-1] + 1) if tiles else 1
        return dataclasses.replace(self, tiles=tuple(sorted(tiles)), col_from=col_from)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CudaDispatch:
        return cls(tuple(data["tiles"]), int(data["col_from"]), int(data["dense_from"]), str(data["source"]))


@dataclasses.dataclass(frozen=True)
class CudaVariants:
    """decode: (tile, DecodeParams) per tile; col: the col kernel's ColParams."""

    decode: tuple[tuple[int, DecodeParams], ...]
    col: ColParams

    @classmethod
    def default(cls) -> CudaVariants:
        """The rules' defaults (unmeasured; records replace them)."""
        from .cuda_rules import ColRule, DecodeRule

        return cls(tuple((t, DecodeRule().default(t)) for t in DECODE_TILES), ColRule().default())

    def layouts(self) -> list[str]:
        return [f"decode{tile}" for tile, _ in self.decode] + ["col", "expand"]

    def schedule_all(self, n_out: int, n_in: int, k_pad: int, k: int, index_dtype: str, dtype: str,
                     has_bias: bool, symbol) -> dict[str, Any]:
        """{layout: scheduled PrimFunc named symbol(layout)}; decode tiles whose rule declines are left out."""
        from .cuda_kernels import col_func, decode_func, expand_func
        from .cuda_rules import ColRule, DecodeRule

        funcs = {}
        for tile, params in self.decode:
            func = decode_func(n_out, n_in, k_pad, index_dtype, dtype, tile=tile, has_bias=has_bias,
                               symbol=symbol(f"decode{tile}"))
            sch = DecodeRule().apply(func, params)
            if sch is not None:
                funcs[f"decode{tile}"] = sch.mod["main"]
        col = ColRule().apply(col_func(n_out, n_in, k_pad, index_dtype, dtype, has_bias=has_bias,
                                       symbol=symbol("col")), self.col)
        funcs["col"] = col.mod["main"]
        funcs["expand"] = expand_func(n_out, n_in, k_pad, k, index_dtype, dtype, rows=expand_rows(n_in, dtype),
                                      symbol=symbol("expand"))
        return funcs

    def decode_tiles(self, layouts) -> tuple[int, ...]:
        """The tiles among the scheduled layouts (``schedule_all``'s keys)."""
        return tuple(t for t, _ in self.decode if f"decode{t}" in layouts)

    def only(self, layouts) -> CudaVariants:
        """These variants less the decode tiles not among ``layouts``."""
        tiles = set(self.decode_tiles(layouts))
        return dataclasses.replace(self, decode=tuple((t, p) for t, p in self.decode if t in tiles))

    def to_dict(self) -> dict[str, Any]:
        return {"decode": [[t, dataclasses.asdict(p)] for t, p in self.decode], "col": dataclasses.asdict(self.col)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CudaVariants:
        return cls(tuple((int(t), DecodeParams(**p)) for t, p in data["decode"]), ColParams(**data["col"]))


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


def _record_path(cache: Path, n_out: int, n_in: int, k_pad: int, dtype: str, arch: str) -> Path:
    return Path(cache) / "cuda" / arch / f"o{n_out}_i{n_in}_k{k_pad}_{dtype}.json"


def lookup(n_out: int, n_in: int, k_pad: int, dtype: str, arch: str, cache: Path) -> CudaRecord | None:
    """The measured record of a shape, or None (a corrupt record is ignored: the defaults are always valid)."""
    path = _record_path(cache, n_out, n_in, k_pad, dtype, arch)
    try:
        data = json.loads(path.read_text())
        return CudaRecord(CudaVariants.from_dict(data["variants"]), CudaDispatch.from_dict(data["dispatch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(cache: Path, n_out: int, n_in: int, k_pad: int, dtype: str, arch: str, record: CudaRecord,
                 evidence: dict[str, Any]) -> Path:
    path = _record_path(cache, n_out, n_in, k_pad, dtype, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"variants": record.variants.to_dict(), "dispatch": record.dispatch.to_dict(),
                                "evidence": evidence}, indent=1))
    return path
