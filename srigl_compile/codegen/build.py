"""Compile (and optionally tune) the kernels of one layer shape; keep tuning records on disk.

A ``KernelSpec`` names a shape (n_out, n_in, padded k, index dtype) and a target. ``get_kernel`` returns its two
compiled layouts, compiled once per process; the schedule parameters come from the tuning records when the shape
was tuned before, from a search when ``tune=True``, else from the rules' defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._tvm import tvm_modules
from .kernels import COL_SYMBOL, ROW_SYMBOL, col_kernel, row_kernel
from .rules import LANES, RULES, ColParams, RowParams, schedule
from .target import target_key

__all__ = ["KernelSpec", "CompiledKernel", "get_kernel", "default_cache_dir", "TuningRecords"]

log = logging.getLogger(__name__)

_DEFAULTS = {"row": RowParams(), "col": ColParams()}
_SYMBOLS = {"row": ROW_SYMBOL, "col": COL_SYMBOL}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    n_out: int
    n_in: int
    k: int
    index_dtype: str
    target: tuple[tuple[str, Any], ...]

    @property
    def target_dict(self) -> dict[str, Any]:
        return dict(self.target)

    @property
    def key(self) -> str:
        return f"o{self.n_out}_i{self.n_in}_k{self.k}_{self.index_dtype}@{target_key(self.target_dict)}"

    def func(self, layout: str):
        if layout == "row":
            return row_kernel(self.n_out, self.n_in, self.k, self.index_dtype)
        return col_kernel(self.n_out, self.n_in, self.k, self.index_dtype, LANES)


@dataclasses.dataclass
class CompiledKernel:
    """Both layouts of one shape: ``row(x, w, idx, bias, y)`` and ``col(xt, w, idx, bias, yt)``."""

    spec: KernelSpec
    params: dict[str, Any]
    executables: dict[str, Any]

    def __post_init__(self) -> None:
        self.row = self.executables["row"].mod[ROW_SYMBOL]
        self.col = self.executables["col"].mod[COL_SYMBOL]


def default_cache_dir() -> Path:
    if os.environ.get("SRIGL_COMPILE_CACHE"):
        return Path(os.environ["SRIGL_COMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "srigl_compile"


class TuningRecords:
    """Best schedule parameters per (shape, target, layout), as JSON in ``<cache_dir>/tuning_records.json``."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(cache_dir or default_cache_dir()) / "tuning_records.json"

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as err:
            log.warning("ignoring unreadable tuning records %s (%s)", self.path, err)
            return {}

    def get(self, spec: KernelSpec, layout: str):
        entry = self._load().get(spec.key, {}).get(layout)
        if entry is None:
            return None
        return type(_DEFAULTS[layout])(**entry["params"])

    def put(self, spec: KernelSpec, layout: str, params, median_us: float) -> None:
        records = self._load()
        records.setdefault(spec.key, {})[layout] = {"params": dataclasses.asdict(params), "median_us": median_us}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.replace(f.name, self.path)  # atomic: a concurrent reader never sees half a file


def _compile(spec: KernelSpec, layout: str, params):
    tvm, _, _ = tvm_modules()
    sch = schedule(spec.func(layout), list(RULES.values()), params)  # rules decline other layouts
    return tvm.compile(sch.mod, target=tvm.target.Target(spec.target_dict))


def _timing_args(spec: KernelSpec, layout: str, device):
    """Realistic operands: sorted distinct indices per row (the gathers must stay in bounds)."""
    tvm, _, _ = tvm_modules()
    rng = np.random.default_rng(0)
    idx = np.sort(np.argsort(rng.random((spec.n_out, spec.n_in)), axis=1)[:, : min(spec.k, spec.n_in)], axis=1)
    if idx.shape[1] < spec.k:  # padded k: repeat the last index, as the lowered layers do
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], spec.k - idx.shape[1], axis=1)], axis=1)
    w = rng.standard_normal((spec.n_out, spec.k), dtype=np.float32)
    bias = rng.standard_normal(spec.n_out, dtype=np.float32)
    if layout == "row":
        x, y = np.ones((1, spec.n_in), np.float32), np.zeros((1, spec.n_out), np.float32)
    else:
        blocks = 256 // LANES
        x, y = np.ones((spec.n_in, blocks, LANES), np.float32), np.zeros((spec.n_out, blocks, LANES), np.float32)
    return [tvm.runtime.tensor(a, device) for a in (x, w, idx.astype(spec.index_dtype), bias, y)]


def _measure(executable, spec: KernelSpec, layout: str) -> float:
    tvm, _, _ = tvm_modules()
    device = tvm.cpu()
    evaluator = executable.mod.time_evaluator(_SYMBOLS[layout], device, number=20, repeat=5, min_repeat_ms=20)
    return float(np.median(evaluator(*_timing_args(spec, layout, device)).results)) * 1e6


def _search(spec: KernelSpec, layout: str, progress) -> tuple[Any, float]:
    best, best_us = None, float("inf")
    for params in RULES[layout].space(spec.k):
        micros = _measure(_compile(spec, layout, params), spec, layout)
        if micros < best_us:
            best, best_us = params, micros
        progress.update(1)
    return best, best_us


_COMPILED: dict[str, CompiledKernel] = {}


def get_kernel(spec: KernelSpec, *, tune: bool = False, cache_dir=None, progress=None) -> CompiledKernel:
    """Compiled kernels for ``spec``: tuned records if present, a search if ``tune``, else defaults."""
    if spec.key in _COMPILED:
        return _COMPILED[spec.key]
    records = TuningRecords(cache_dir)
    params, executables = {}, {}
    for layout in ("row", "col"):
        chosen = records.get(spec, layout)
        if chosen is None and tune:
            if progress is not None:
                progress.total = (progress.total or 0) + len(RULES[layout].space(spec.k))
                progress.refresh()
            chosen, micros = _search(spec, layout, progress if progress is not None else _NoProgress())
            records.put(spec, layout, chosen, micros)
        params[layout] = chosen or _DEFAULTS[layout]
        executables[layout] = _compile(spec, layout, params[layout])
    kernel = CompiledKernel(spec, params, executables)
    _COMPILED[spec.key] = kernel
    return kernel


class _NoProgress:
    def update(self, n: int) -> None:
        pass


class LoadedKernel:
    """Kernels loaded from exported libraries (``load_lowered``): the same ``row`` / ``col`` interface."""

    def __init__(self, spec: KernelSpec, modules: dict[str, Any], files: dict[str, Path]) -> None:
        self.spec, self.modules, self.files = spec, modules, files
        self.row = modules["row"][ROW_SYMBOL]
        self.col = modules["col"][COL_SYMBOL]
