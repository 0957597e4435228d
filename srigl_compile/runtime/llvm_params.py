"""The CPU kernels' schedule variants: what a handle records (and a manifest stores) about how it was compiled.
The rules that apply them, their defaults and search spaces are in ``codegen.rules``.

Example:
    >>> ColParams(rows=32, kin=8).lanes
    64
"""

from __future__ import annotations

import dataclasses

__all__ = ["RowParams", "ColParams"]


@dataclasses.dataclass(frozen=True)
class RowParams:
    """vec: k-inner vector width (must divide k); chunk: output rows per parallel task; unroll: ko unroll steps."""

    vec: int = 8
    chunk: int = 32
    unroll: int = 16


@dataclasses.dataclass(frozen=True)
class ColParams:
    """rows: output rows per task; kin: k-inner tile (divides k); rin: rows interleaved; lanes: batch tile width;
    share (offset kernel only): consecutive rows reading one shared list of inputs (the union of theirs, zero
    weights where a row lacks one), so each input vector loaded serves ``share`` rows; 1: every row its own."""

    rows: int = 32
    kin: int = 8
    rin: int = 1
    lanes: int = 64
    share: int = 1
