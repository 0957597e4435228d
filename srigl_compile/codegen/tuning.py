"""Compile the condensed kernels of one shape, and pick their schedule variants (tuned once, kept on disk).

``select_params`` returns a layout's variant: the stored record if the shape was tuned before, a timed search over
the rule's ``space`` when ``tune=True`` (then stored), else the rule's default. Records are JSON files under
``cache_dir`` (default ``$SRIGL_COMPILE_CACHE`` or ``~/.cache/srigl_compile/tuning``), one per key
(op, layout, n_out, n_in, k, index dtype, bias, target). ``compile_kernels`` compiles a shape's row and col kernels
into one library and keeps it for the life of the process, so repeated layers compile once;
``compile_offset_kernel`` does the same for a convolution's direct (offset) kernel.

Everything here is keyed by a ``KernelSpec``'s padded shape: layers whose k differ but round up to the same
``k_pad`` share records and compiled libraries.

Example:
    >>> spec = KernelSpec(768, 3072, 307, "int16", True)
    >>> params = select_params(spec, "row", host_llvm_target(), tune=True)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LoweringError
from ..runtime.conv_geometry import column_offsets, direct_plan
from ..runtime.cpu_features import missing_host_features
from ..runtime.spec import LINEAR_GLUE, MID_LANES, KernelSpec, block_rows, target_key
from ._tvm_compat import import_tvm
from .cpu_target import has_bit_extract
from .glue_kernels import glue_funcs
from .kernels import col_kernel, fused_pack_supported, offset_kernel, pack_kernel, row_kernel
from .rules import RULES, ColParams, RowParams

__all__ = ["TuningRecords", "default_cache_dir", "select_params", "tune_layout", "compile_kernels",
           "compile_offset_kernel", "kernel_func", "pack_func", "TIMING_BATCH", "mid_params"]

log = logging.getLogger(__name__)

TIMING_BATCH = {"row": 1, "col": 256, "offset": 1}  # the batch each layout is timed at while tuning
_PARAMS = {"row": RowParams, "col": ColParams, "offset": ColParams}
TIMING_IMAGE = 14  # the offset (direct conv) layout is timed on 14x14 images (ResNet stage 3)


def kernel_func(spec: KernelSpec, layout: str, params, target: Mapping[str, Any]):
    """The unscheduled PrimFunc of one layout ("row", "col", "fused", "offset") for the padded shape."""
    k, values = spec.k_pad, spec.dtype or "float32"
    if layout == "row":
        return row_kernel(spec.n_out, spec.n_in, k, spec.index_dtype, spec.has_bias, spec.symbol("row"),
                          bit_extract=has_bit_extract(target), epilogue=spec.epilogue, value_dtype=values)
    if layout == "offset":
        return offset_kernel(spec.n_out, k, params.lanes, spec.has_bias, spec.symbol("offset"), params.rows,
                             params.kin, spec.epilogue, values, params.share)
    return col_kernel(spec.n_out, spec.n_in, k, spec.index_dtype, params.lanes, spec.has_bias, spec.symbol(layout),
                      block=(params.rows, params.kin), fused_pack=layout == "fused", epilogue=spec.epilogue,
                      value_dtype=values)


def _fits(spec: KernelSpec, layout: str, params, target: Mapping[str, Any]) -> bool:
    """Whether ``params`` is a variant the layout's rule schedules for this shape (a blocked kernel cannot even be
    defined with a k-tile that does not divide k)."""
    try:
        func = kernel_func(spec, layout, params, target)
    except ValueError:
        return False
    return RULES[layout].apply(func, target, params) is not None


def pack_func(spec: KernelSpec, lanes: int, layout: str = "pack"):
    """x [B, n_in] -> [B / lanes, n_in, lanes] tiles, named ``spec.symbol(layout)``."""
    return pack_kernel(spec.n_in, lanes, spec.symbol(layout))


def _padded(spec: KernelSpec) -> tuple:
    """What a CPU library depends on: the shape with k padded (not the real k, nor a convolution's tile)."""
    return spec.n_out, spec.n_in, spec.k_pad, spec.index_dtype, spec.has_bias, spec.epilogue, spec.dtype


def default_cache_dir() -> Path:
    """``$SRIGL_COMPILE_CACHE`` if set, else ``$XDG_CACHE_HOME/srigl_compile/tuning`` (``~/.cache`` by default)."""
    if os.environ.get("SRIGL_COMPILE_CACHE"):
        return Path(os.environ["SRIGL_COMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "srigl_compile" / "tuning"


class TuningRecords:
    """Best variant per key, one JSON file per key in ``cache_dir`` (written atomically)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def get(self, key: str, layout: str):
        try:
            record = json.loads(self.path(key).read_text())
            if record["key"] != key:
                return None
            return _PARAMS[layout](**record["params"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable or from another version: re-tune
            log.warning("ignoring tuning record %s (%s)", self.path(key), err)
            return None

    def put(self, key: str, params, median_us: float, candidates: list[dict]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "params": dataclasses.asdict(params), "median_us": median_us, "candidates": candidates}
        with tempfile.NamedTemporaryFile("w", dir=self.dir, delete=False, suffix=".tmp") as f:
            json.dump(record, f, indent=1)
        os.replace(f.name, self.path(key))  # a concurrent reader never sees half a file
        return self.path(key)


_COMPILED: dict[tuple, Any] = {}


def _build(funcs: dict[str, Any], target: Mapping[str, Any]):
    tvm = import_tvm()
    mod = tvm.IRModule({name: func for name, func in funcs.items()})
    return tvm.compile(mod, target=tvm.target.Target(dict(target)))


def _scheduled(spec: KernelSpec, layout: str, params, target):
    sch = RULES[layout].apply(kernel_func(spec, layout, params, target), target, params)
    if sch is None:
        raise ValueError(f"the {layout} rule declines {params} for {spec}")
    return sch.mod["main"]


def mid_params(col: ColParams) -> ColParams:
    """The mid-batch variant of a col schedule: one 8-lane vector of batch rows, 4 rows interleaved for
    independent accumulators (a few batch rows share each weight and index load, and x[idx] is one vector load
    instead of a gather)."""
    return dataclasses.replace(col, lanes=MID_LANES, rin=4 if col.rows % 4 == 0 else 1)


def compile_kernels(spec: KernelSpec, row: RowParams, col: ColParams, target: Mapping[str, Any]):
    """One executable holding ``spec.symbol(layout)`` for layout in row, col, pack, mid, packmid (the col
    kernel and its pack at ``MID_LANES`` lanes), fused (the col kernel packing its tiles itself), and the model's
    glue in ``runtime.spec.LINEAR_GLUE`` (the layer norm); cached per process."""
    key = (_padded(spec), row, col, target_key(target))
    if key not in _COMPILED:
        symbol = spec.symbol
        funcs = {symbol("row"): _scheduled(spec, "row", row, target),
                 symbol("col"): _scheduled(spec, "col", col, target),
                 symbol("pack"): RULES["pack"].apply(pack_func(spec, col.lanes), target).mod["main"],
                 symbol("mid"): _scheduled(spec, "col", mid_params(col), target).with_attr("global_symbol",
                                                                                            symbol("mid")),
                 symbol("packmid"): RULES["pack"].apply(pack_func(spec, MID_LANES, "packmid"), target).mod["main"],
                 **glue_funcs(symbol, LINEAR_GLUE)}
        if fused_pack_supported(spec.n_in, spec.index_dtype):
            funcs[symbol("fused")] = RULES["col"].apply(kernel_func(spec, "fused", col, target), target,
                                                        col).mod["main"]
        _COMPILED[key] = _build(funcs, target)
        log.info("compiled %s (row %s, col %s)", spec, row, col)
    return _COMPILED[key]


def compile_offset_kernel(spec: KernelSpec, params: ColParams, target: Mapping[str, Any]):
    """An executable holding ``spec.symbol("offset")`` (the direct-convolution kernel) and the TIR helpers around
    it (``glue_kernels``: ``spec.symbol(name)`` for each name in ``runtime.spec.CONV_GLUE``); cached per process."""
    key = (_padded(spec), "offset", params, target_key(target))
    if key not in _COMPILED:
        funcs = {spec.symbol("offset"): _scheduled(spec, "offset", params, target), **glue_funcs(spec.symbol)}
        _COMPILED[key] = _build(funcs, target)
        log.info("compiled %s (offset %s)", spec, params)
    return _COMPILED[key]


def _offset_geometry(spec: KernelSpec, params: ColParams):
    """A representative image for timing the offset kernel: a 3x3 kernel when the width allows, else 1x1."""
    kernel = (3, 3) if spec.n_in % 9 == 0 else (1, 1)
    pad = (kernel[0] // 2, kernel[1] // 2)
    plan = direct_plan(TIMING_IMAGE, TIMING_IMAGE, kernel, pad, (1, 1), params.lanes)
    return kernel, plan, spec.n_in // (kernel[0] * kernel[1])


def _timing_args(spec: KernelSpec, layout: str, params, device) -> list:
    """Realistic operands: sorted distinct in-range indices per row (garbage indices would read out of bounds)."""
    tvm = import_tvm()
    rng = np.random.default_rng(0)
    k, n_out, n_in = spec.k_pad, spec.n_out, spec.n_in
    k_real = min(k, n_in)
    idx = np.sort(np.argsort(rng.random((n_out, n_in)), axis=1)[:, :k_real], axis=1)
    idx = np.concatenate([idx, np.repeat(idx[:, -1:], k - k_real, axis=1)], axis=1)
    if layout == "offset":
        kernel, plan, channels = _offset_geometry(spec, params)
        idx = column_offsets(torch.from_numpy(idx), kernel, (1, 1), plan, n_in).numpy()
    idx = idx.astype("int32" if layout == "offset" else spec.index_dtype)
    ops = [rng.standard_normal((n_out, k), dtype=np.float32),
           idx.view(np.int64) if layout == "row" else idx]  # (the row kernel reads 64-bit index words)
    if layout in ("offset", "col"):  # operands blocked as the kernel reads them
        ops = [block_rows(torch.from_numpy(a), params.rows, params.kin).numpy() for a in ops]
    if spec.has_bias:
        ops.append(rng.standard_normal(n_out, dtype=np.float32))
    if layout == "row":
        x, y = np.ones((TIMING_BATCH["row"], n_in)), np.zeros((TIMING_BATCH["row"], n_out))
    elif layout == "offset":
        x = np.ones((TIMING_BATCH["offset"], channels * plan.rows * plan.pitch))
        y = np.zeros((TIMING_BATCH["offset"], n_out, plan.tiles, params.lanes))
    else:
        tiles = -(-TIMING_BATCH["col"] // params.lanes)
        x, y = np.ones((tiles, n_in, params.lanes)), np.zeros((tiles, params.lanes, n_out))
    return [tvm.runtime.tensor(np.asarray(a, np.float32) if a.dtype == np.float64 else a, device)
            for a in [x, *ops, y]]


def _measure_us(spec: KernelSpec, layout: str, params, target, repeat: int) -> float:
    tvm = import_tvm()
    executable = _build({spec.symbol(layout): _scheduled(spec, layout, params, target)}, target)
    device = tvm.cpu()
    evaluator = executable.mod.time_evaluator(spec.symbol(layout), device, number=5, repeat=repeat,
                                              min_repeat_ms=10)
    return float(np.median(evaluator(*_timing_args(spec, layout, params, device)).results)) * 1e6


def tune_layout(spec: KernelSpec, layout: str, target: Mapping[str, Any], *, space: Sequence | None = None,
                repeat: int = 5, progress: bool | None = None) -> tuple[Any, float, list[dict]]:
    """Time every variant of ``space`` that the rule accepts (default: the rule's space, its default first);
    returns the fastest, its median time in microseconds, and every candidate's time."""
    from tqdm.auto import tqdm

    rule = RULES[layout]
    if space is None:
        default = rule.default(spec.k_pad, target)
        space = [default] + [p for p in rule.space(spec.k_pad) if p != default]
    fits = [p for p in space if _fits(spec, layout, p, target)]
    if not fits:
        raise ValueError(f"the {layout} rule declines every variant of {list(space)} for {spec}")
    candidates, best, best_us = [], None, float("inf")
    for params in tqdm(fits, desc=f"tuning {layout} o{spec.n_out} i{spec.n_in} k{spec.k_pad}", leave=False,
                       disable=None if progress is None else not progress):
        micros = _measure_us(spec, layout, params, target, repeat)
        candidates.append({"params": dataclasses.asdict(params), "median_us": micros})
        if micros < best_us:
            best, best_us = params, micros
    return best, best_us, candidates


def select_params(spec: KernelSpec, layout: str, target: Mapping[str, Any], *, tune: bool = False,
                  cache_dir: str | os.PathLike | None = None, space: Sequence | None = None,
                  progress: bool | None = None):
    """The variant to compile: stored record, else a search (``tune=True``, then stored), else the default."""
    records = TuningRecords(cache_dir)
    key = spec.record_key(layout, target_key(target))
    found = records.get(key, layout)
    if found is not None and _fits(spec, layout, found, target):
        return found
    if not tune:
        return RULES[layout].default(spec.k_pad, target)
    lacking = missing_host_features(target)
    if lacking:  # timing runs the kernels here, which would kill the process
        raise LoweringError(f"cannot tune for {target.get('mcpu')} on this machine: it lacks {list(lacking)}. "
                            "Tune on that CPU, or lower with tune=False.")
    # Timed as the plain float32 shape: records are shared by a shape's kernels whatever their values' dtype and
    # whatever they compute after the sum.
    best, best_us, candidates = tune_layout(dataclasses.replace(spec, epilogue="", dtype=None), layout, target,
                                            space=space, progress=progress)
    path = records.put(key, best, best_us, candidates)
    log.info("tuned %s: %s at %.1f us (record %s)", key, best, best_us, path)
    return best
