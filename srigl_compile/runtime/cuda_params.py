"""What a CUDA handle records about its kernels: the schedule variants compiled (``CudaVariants``) and which kernel
runs at which batch (``CudaDispatch``). The rules, their defaults and spaces, the cost model and the measured
records that choose them are in ``codegen.cuda_rules`` / ``codegen.cuda_records``.

Example:
    >>> CudaDispatch((1, 4, 8, 16), col_from=33, dense_from=512).regime(20)
    'decode'
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["DecodeParams", "ColParams", "CudaVariants", "CudaDispatch"]


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """warps: rows of a block (a warp each: more rows share one staged x); vec: fan-in positions a lane loads at
    once; stage: x staged in shared memory (else read through L1; tile 1 only)."""

    warps: int = 16
    vec: int = 8
    stage: bool = True


@dataclasses.dataclass(frozen=True)
class ColParams:
    """threads: batch columns a block; rows: output rows a thread; unroll: fan-in steps unrolled."""

    threads: int = 64
    rows: int = 1
    unroll: int = 8


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

    def layouts(self) -> list[str]:
        return [f"decode{tile}" for tile, _ in self.decode] + ["col", "expand"]

    def decode_tiles(self, layouts) -> tuple[int, ...]:
        """The tiles among the scheduled layouts (``codegen.cuda_records.schedule_all``'s keys)."""
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
