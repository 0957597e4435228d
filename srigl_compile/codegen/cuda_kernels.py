"""CUDA condensed kernels: definitions, schedules, and ahead-of-time compilation to fatbins with nvcc.

    row (small batch):  y[b, o]  = bias[o] + sum_r w[o, r] * x[b, idx[o, r]]       x [B, n_in]
        a warp per output row; its 32 lanes stride the fan-in; TVM lowers the reduction bound to threadIdx.x to a
        warp-shuffle all-reduce. Rows of a block on threadIdx.y, batch rows on blockIdx.y.
    col (large batch):  yt[o, b] = bias[o] + sum_r w[o, r] * xt[idx[o, r], b]      xt [n_in, B]
        threads along the batch (consecutive threads read consecutive xt columns: coalesced), every thread keeps
        ``rows`` accumulators in registers; w[o, r] and idx[o, r] are the same for the whole warp (broadcast).

Inputs and weights may be float32, float16 or bfloat16; products accumulate in float32. Compilation needs no GPU:
TVM generates CUDA C, and ``compile_fatbin`` turns it into a fatbin for a given ``sm_XX`` with nvcc, so the GPU
machine needs no compiler (``cuda_build`` wires this into lower(target="cuda")).

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
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoweringError
from ._tvm_compat import import_tvm

__all__ = ["CudaRowParams", "CudaColParams", "row_func", "col_func", "row_schedule", "col_schedule", "cuda_source",
           "compile_fatbin", "gencode_flags", "ROW_SYMBOL", "COL_SYMBOL"]

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


def _operands(te, n_out: int, k: int, index_dtype: str, dtype: str, has_bias: bool):
    bias = [te.placeholder((n_out,), dtype, name="bias")] if has_bias else []
    return [te.placeholder((n_out, k), dtype, name="w"), te.placeholder((n_out, k), index_dtype, name="idx"), *bias]


def _f32(value, dtype: str):
    return value if dtype == "float32" else value.astype("float32")


def _condensed_func(layout: str, n_out: int, n_in: int, k: int, index_dtype: str, dtype: str, has_bias: bool,
                    symbol: str | None):
    """row: x [B, n_in] -> y [B, n_out]; col: xt [n_in, B] -> yt [n_out, B]. Products accumulate in float32."""
    te = import_tvm().te
    batch = te.var("B", "int64")
    weights = _operands(te, n_out, k, index_dtype, dtype, has_bias)
    w, idx = weights[:2]
    r = te.reduce_axis((0, k), name="r")
    if layout == "row":
        x = te.placeholder((batch, n_in), dtype, name="x")
        shape, read, row_of = (batch, n_out), (lambda b, o, j: x[b, j]), (lambda b, o: o)
    else:
        x = te.placeholder((n_in, batch), dtype, name="xt")
        shape, read, row_of = (n_out, batch), (lambda o, b, j: x[j, b]), (lambda o, b: o)
    acc = te.compute(shape, lambda i, j: te.sum(
        _f32(w[row_of(i, j), r], dtype) * _f32(read(i, j, idx[row_of(i, j), r].astype("int64")), dtype), axis=r),
        name="acc")
    if has_bias:
        bias = weights[2]
        y = te.compute(shape, lambda i, j: (acc[i, j] + _f32(bias[row_of(i, j)], dtype)).astype(dtype), name="y")
    else:  # a separate block all the same, so both variants schedule alike
        y = te.compute(shape, lambda i, j: acc[i, j].astype(dtype), name="y")
    symbol = symbol or (ROW_SYMBOL if layout == "row" else COL_SYMBOL)
    return te.create_prim_func([x, *weights, y]).with_attr("global_symbol", symbol)


def row_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32", *, has_bias: bool = True,
             symbol: str | None = None):
    return _condensed_func("row", n_out, n_in, k, index_dtype, dtype, has_bias, symbol)


def col_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32", *, has_bias: bool = True,
             symbol: str | None = None):
    return _condensed_func("col", n_out, n_in, k, index_dtype, dtype, has_bias, symbol)


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


def gencode_flags(arch: str | Sequence[str]) -> list[str]:
    """nvcc flags for machine code (SASS) of every arch, plus PTX of the lowest so newer GPUs can JIT it."""
    arches = [arch] if isinstance(arch, str) else sorted(set(arch))
    if not arches or any(not a.startswith("sm_") for a in arches):
        raise LoweringError(f"CUDA archs look like 'sm_90'; got {arch!r}")
    flags = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in arches]
    return flags + [f"-gencode=arch=compute_{arches[0][3:]},code=compute_{arches[0][3:]}"]


def compile_fatbin(source: str, arch: str | Sequence[str], cache_dir: str | Path | None = None) -> bytes:
    """nvcc --fatbin with SASS for ``arch`` (e.g. "sm_90", or several) and PTX of the lowest; results are cached
    by a hash of (source, arch)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        raise LoweringError("nvcc was not found: install the CUDA toolkit (nvcc) to build CUDA kernels")
    flags = gencode_flags(arch)
    digest = hashlib.sha256(f"{flags}\n{source}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else None
    if cache and (cache / f"{digest}.fatbin").exists():
        return (cache / f"{digest}.fatbin").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.fatbin"
        src.write_text(source)
        result = subprocess.run([nvcc, "--fatbin", *flags, "-O3", "-o", str(out), str(src)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise LoweringError(f"nvcc failed for {arch}: {result.stderr.strip()[:2000]}")
        fatbin = out.read_bytes()
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{digest}.fatbin").write_bytes(fatbin)
    return fatbin
