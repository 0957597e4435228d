"""CUDA condensed kernels: definitions (TE / TIR), and ahead-of-time compilation to fatbins with nvcc.

One layer shape gets three kernels, one per regime (``cuda_rules`` schedules them; ``runtime.cuda_linear`` picks
one per call by batch size):

    decode (batch 1..~32): y[b, o] = bias[o] + sum_r w[o, r] * xs[idx[o, r], b]     x [B, n_in], y [B, n_out]
        ``xs`` is a static tile of ``tile`` batch columns of x, transposed to [n_in, tile] (zero past B) and staged
        in shared memory once per block, so a lane's gather at one index reads all the tile's columns at once.
        Bandwidth-bound on the weights: lanes read 16-byte vectors of values and indices.
    col (medium / large batch): yt[o, b] = bias[o] + sum_r w[o, r] * xt[idx[o, r], b]     xt [n_in, B]
        threads along the batch (coalesced), weights warp-uniform, rows accumulated in registers.
    expand (large batch): dense[o, idx[o, r]] = w[o, r] (zero elsewhere), for cuBLAS (tensor cores) to multiply:
        at large batch a CUDA-core gather cannot keep up with dense fp16 on tensor cores, whatever the sparsity.

Inputs and weights may be float32, float16 or bfloat16; products accumulate in float32. Compilation needs no GPU:
TVM generates CUDA C, ``compile_fatbin`` turns it into a fatbin with nvcc, so the GPU machine needs no compiler.

Example:
    >>> func = decode_func(768, 3072, 312, "int16", "float16", tile=8)                           # doctest: +SKIP
    >>> source = cuda_source(DecodeRule().apply(func, DecodeParams()), "sm_90")                  # doctest: +SKIP
    >>> fatbin = compile_fatbin(source, "sm_90")                                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoweringError
from ._tvm_compat import import_tvm

__all__ = ["decode_func", "col_func", "expand_func", "cuda_source", "compile_fatbin", "gencode_flags",
           "EXPAND_THREADS"]

EXPAND_THREADS = 256


def _f32(value, dtype: str):
    return value if dtype == "float32" else value.astype("float32")


def _weights(te, n_out: int, k: int, index_dtype: str, dtype: str, has_bias: bool):
    bias = [te.placeholder((n_out,), dtype, name="bias")] if has_bias else []
    return [te.placeholder((n_out, k), dtype, name="w"), te.placeholder((n_out, k), index_dtype, name="idx"), *bias]


def _output(te, read, weights, shape, row_of, dtype: str, has_bias: bool):
    """The output block: read(i, j) (+ bias) cast to the dtype (a separate block with or without bias, so both
    schedule alike; te.sum's init is dropped by create_prim_func, TVM.md)."""
    if has_bias:
        bias = weights[2]
        return te.compute(shape, lambda i, j: (read(i, j) + _f32(bias[row_of(i, j)], dtype)).astype(dtype), name="y")
    return te.compute(shape, lambda i, j: read(i, j).astype(dtype), name="y")


def decode_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32", *, tile: int,
                has_bias: bool = True, symbol: str = "srigl_cuda_decode"):
    """x [B, n_in] -> y [B, n_out] for B <= ``tile``: x staged as xs [n_in, tile] (zero past B).

    The gather index is clamped to [0, n_in): the indices are in range already (``pack_operands`` checks), and the
    clamp is what lets TVM bound the region of xs a block reads, so that xs can be staged per block."""
    tvm = import_tvm()
    te = tvm.te
    batch = te.var("B", "int64")
    x = te.placeholder((batch, n_in), dtype, name="x")
    weights = _weights(te, n_out, k, index_dtype, dtype, has_bias)
    w, idx = weights[:2]
    zero = tvm.tirx.const(0, dtype)
    xs = te.compute((n_in, tile), lambda j, b: te.if_then_else(b < batch, x[b, j], zero), name="xs")
    r = te.reduce_axis((0, k), name="r")
    clamp = lambda i: te.max(te.min(i.astype("int64"), n_in - 1), 0)  # noqa: E731
    term = lambda b, o: _f32(w[o, r], dtype) * _f32(xs[clamp(idx[o, r]), b], dtype)  # noqa: E731
    if tile == 1:  # (no batch axis: TVM's cross-thread reduction fails to lower a unit one)
        acc_1d = te.compute((n_out,), lambda o: te.sum(term(0, o), axis=r), name="acc")
        acc = lambda b, o: acc_1d[o]  # noqa: E731
    else:
        acc_2d = te.compute((tile, n_out), lambda b, o: te.sum(term(b, o), axis=r), name="acc")
        acc = lambda b, o: acc_2d[b, o]  # noqa: E731
    y = _output(te, acc, weights, (batch, n_out), lambda b, o: o, dtype, has_bias)
    return te.create_prim_func([x, *weights, y]).with_attr(
        {"global_symbol": symbol, "srigl.layout": "decode", "srigl.tile": tile})


def col_func(n_out: int, n_in: int, k: int, index_dtype: str, dtype: str = "float32", *, has_bias: bool = True,
             symbol: str = "srigl_cuda_col"):
    """xt [n_in, B] -> yt [n_out, B] (the batch contiguous)."""
    te = import_tvm().te
    batch = te.var("B", "int64")
    x = te.placeholder((n_in, batch), dtype, name="xt")
    weights = _weights(te, n_out, k, index_dtype, dtype, has_bias)
    w, idx = weights[:2]
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((n_out, batch), lambda o, b: te.sum(
        _f32(w[o, r], dtype) * _f32(x[idx[o, r].astype("int64"), b], dtype), axis=r), name="acc")
    y = _output(te, lambda o, b: acc[o, b], weights, (n_out, batch), lambda o, b: o, dtype, has_bias)
    return te.create_prim_func([x, *weights, y]).with_attr({"global_symbol": symbol, "srigl.layout": "col"})


def expand_func(n_out: int, n_in: int, k_pad: int, k: int, index_dtype: str, dtype: str, *, rows: int,
                symbol: str = "srigl_cuda_expand"):
    """w, idx [n_out, k_pad] -> dense [n_out, n_in]: a block per ``rows`` rows zeroes them in shared memory,
    scatters the row's first ``k`` (real) entries, and writes the rows out coalesced. Written directly in TIR
    (TE has no scatter). Only the real k: the padding entries repeat the last index with a zero weight."""
    from tvm.script import tirx as T

    blocks, threads, size = -(-n_out // rows), EXPAND_THREADS, rows * n_in

    @T.prim_func
    def expand(w: T.Buffer((n_out, k_pad), dtype), idx: T.Buffer((n_out, k_pad), index_dtype),
               dense: T.Buffer((n_out, n_in), dtype)):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True, "srigl.layout": "expand"})
        bx = T.launch_thread("blockIdx.x", blocks)
        tx = T.launch_thread("threadIdx.x", threads)
        tile = T.alloc_buffer((size,), dtype, scope="shared.dyn")
        for i in range((size + threads - 1) // threads):
            if i * threads + tx < size:
                tile[i * threads + tx] = T.Cast(dtype, 0)
        T.tvm_storage_sync("shared")
        for i in range((rows * k + threads - 1) // threads):
            if i * threads + tx < rows * k and bx * rows + (i * threads + tx) // k < n_out:
                tile[(i * threads + tx) // k * n_in + T.Cast("int32", idx[bx * rows + (i * threads + tx) // k,
                                                                          (i * threads + tx) % k])] = \
                    w[bx * rows + (i * threads + tx) // k, (i * threads + tx) % k]
        T.tvm_storage_sync("shared")
        for i in range((size + threads - 1) // threads):
            if i * threads + tx < size and bx * rows + (i * threads + tx) // n_in < n_out:
                dense[bx * rows + (i * threads + tx) // n_in, (i * threads + tx) % n_in] = tile[i * threads + tx]

    return expand


def cuda_source(sch_or_func, arch: str) -> str:
    """CUDA C of a scheduled kernel (a Schedule, or an already scheduled PrimFunc) for ``arch``; no GPU needed."""
    tvm = import_tvm()
    mod = sch_or_func.mod if hasattr(sch_or_func, "mod") else tvm.IRModule({"main": sch_or_func})
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": arch}))
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
