"""CUDA condensed kernels: definitions, schedules, and ahead-of-time compilation to fatbins with nvcc.

    row (small batch):  y[b, o]  = bias[o] + sum_r w[o, r] * x[b, idx[o, r]]       x [B, n_in]
        a warp per output row; its 32 lanes stride the fan-in; TVM lowers the reduction bound to threadIdx.x to a
        warp-shuffle all-reduce. Rows of a block on threadIdx.y, batch rows on blockIdx.y.
    col (large batch):  yt[o, b] = bias[o] + sum_r w[o, r] * xt[idx[o, r], b]      xt [n_in, B]
        threads along the batch (consecutive threads read consecutive xt columns: coalesced), every thread keeps
        ``rows`` accumulators in registers; w[o, r] and idx[o, r] are the same for the whole warp (broadcast).

Inputs and weights may be float32, float16 or bfloat16; products accumulate in float32. Compilation needs no GPU:
TVM generates CUDA C, and ``compile_fatbin`` turns it into a fatbin for a given ``sm_XX`` with nvcc, so the GPU
machine needs no compiler. Running these kernels from lower(target="cuda") is not wired up yet (no GPU was
available to verify it).

Example:
    >>> source = cuda_source(row_schedule(row_func(768, 3072, 312, "int16", "float32")), "sm_90")   # doctest: +SKIP
    >>> fatbin = compile_fatbin(source, "sm_90")                                                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import LoweringError
from ._tvm_compat import import_tvm

__all__ = ["CudaRowParams", "CudaColParams", "row_func", "col_func", "row_schedule", "col_schedule", "cuda_source",
           "compile_fatbin", "ROW_SYMBOL", "COL_SYMBOL"]

ROW_SYMBOL = "srigl_cuda_row"
COL_SYMBOL = "srigl_cuda_col"


@dataclasses.dataclass(frozen=True)
class CudaRowParams:
    warps: int = 4  # output rows (one warp each) per block


@dataclasses.dataclass(frozen=True)
class CudaColParams:
    threads: int = 128  # batch columns per block
    rows: int = 4  # output rows per thread, accumulated in registers
    unroll: int = 4  # fan-in steps unrolled


def _operands(te, n_out: int, k: int, index_dtype: str, dtype: str):
    return (te.placeholder((n_out, k), dtype, name="w"), te.placeholder((n_out, k), index_dtype, name="idx"),
            te.placeholder((n_out,), dtype, name="bias"))


def _f32(value, dtype: str):
    return value if dtype == "float32" else value.astype("float32")


def row_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32"):
    te = import_tvm().te
    batch = te.var("B", "int64")
    x = te.placeholder((batch, n_in), dtype, name="x")
    w, idx, bias = _operands(te, n_out, k, index_dtype, dtype)
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((batch, n_out), lambda b, o: te.sum(
        _f32(w[o, r], dtype) * _f32(x[b, idx[o, r].astype("int64")], dtype), axis=r), name="acc")
    y = te.compute((batch, n_out), lambda b, o: (acc[b, o] + _f32(bias[o], dtype)).astype(dtype), name="y")
    return te.create_prim_func([x, w, idx, bias, y]).with_attr("global_symbol", ROW_SYMBOL)


def col_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32"):
    te = import_tvm().te
    batch = te.var("B", "int64")
    xt = te.placeholder((n_in, batch), dtype, name="xt")
    w, idx, bias = _operands(te, n_out, k, index_dtype, dtype)
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((n_out, batch), lambda o, b: te.sum(
        _f32(w[o, r], dtype) * _f32(xt[idx[o, r].astype("int64"), b], dtype), axis=r), name="acc")
    y = te.compute((n_out, batch), lambda o, b: (acc[o, b] + _f32(bias[o], dtype)).astype(dtype), name="y")
    return te.create_prim_func([xt, w, idx, bias, y]).with_attr("global_symbol", COL_SYMBOL)


def row_schedule(func, params: CudaRowParams = CudaRowParams()):
    s_tir = import_tvm().s_tir
    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
    batch, rows, red = sch.get_loops(acc)
    row_block, row = sch.split(rows, [None, params.warps])
    red_outer, lane = sch.split(red, [None, 32])
    sch.reorder(batch, row_block, row, lane, red_outer)
    sch.bind(batch, "blockIdx.y")
    sch.bind(row_block, "blockIdx.x")
    sch.bind(row, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")  # cross-thread reduction: TVM emits a warp-shuffle all-reduce
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(out, row)
    return sch


def col_schedule(func, params: CudaColParams = CudaColParams()):
    s_tir = import_tvm().s_tir
    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
    rows, batch, red = sch.get_loops(acc)
    row_block, row = sch.split(rows, [None, params.rows])
    batch_block, lane = sch.split(batch, [None, params.threads])
    red_outer, red_inner = sch.split(red, [None, params.unroll])
    sch.reorder(row_block, batch_block, lane, red_outer, red_inner, row)
    sch.bind(row_block, "blockIdx.y")
    sch.bind(batch_block, "blockIdx.x")
    sch.bind(lane, "threadIdx.x")
    sch.unroll(red_inner)
    sch.unroll(row)
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, red_outer)
    sch.reverse_compute_at(out, lane)
    return sch


def cuda_source(sch, arch: str) -> str:
    """CUDA C of a scheduled kernel (compiled by TVM for ``{"kind": "cuda", "arch": arch}``; no GPU needed)."""
    tvm = import_tvm()
    executable = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    modules = [m for m in executable.mod.imports if m.kind == "cuda"] or list(executable.mod.imports)
    return modules[0].inspect_source()


def compile_fatbin(source: str, arch: str, cache_dir: str | Path | None = None) -> bytes:
    """nvcc --fatbin for ``arch`` (e.g. "sm_90"); results are cached by a hash of (source, arch)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        raise LoweringError("nvcc was not found: install the CUDA toolkit (nvcc) to build CUDA kernels")
    digest = hashlib.sha256(f"{arch}\n{source}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else None
    if cache and (cache / f"{digest}.fatbin").exists():
        return (cache / f"{digest}.fatbin").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.fatbin"
        src.write_text(source)
        result = subprocess.run([nvcc, "--fatbin", f"-arch={arch}", "-O3", "-o", str(out), str(src)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise LoweringError(f"nvcc failed for {arch}: {result.stderr.strip()[:2000]}")
        fatbin = out.read_bytes()
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{digest}.fatbin").write_bytes(fatbin)
    return fatbin
