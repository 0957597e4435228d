"""CUDA kernels compile on a machine without a GPU: TVM's CUDA C, then nvcc fatbins for sm_80 and sm_90, with the
thread bindings and memory accesses the schedules promise. (Numerics need a GPU: not run here.)"""

import re
import shutil

import pytest

from srigl_compile.codegen.cuda_kernels import (
    col_func,
    col_schedule,
    compile_fatbin,
    cuda_source,
    row_func,
    row_schedule,
)

pytestmark = pytest.mark.tvm
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not __import__("os").path.exists(
    "/usr/local/cuda/bin/nvcc"), reason="nvcc is not installed")

LAYOUTS = {"row": (row_func, row_schedule), "col": (col_func, col_schedule)}


def source(layout, n_out=768, n_in=3072, k=312, index_dtype="int16", dtype="float32", arch="sm_90"):
    func, sched = LAYOUTS[layout]
    return cuda_source(sched(func(n_out, n_in, k, index_dtype, dtype)), arch)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_kernels_compile_to_fatbins(layout, dtype, arch, tmp_path):
    fatbin = compile_fatbin(source(layout, dtype=dtype, arch=arch), arch, cache_dir=tmp_path)
    assert len(fatbin) > 1000
    assert compile_fatbin(source(layout, dtype=dtype, arch=arch), arch, cache_dir=tmp_path) == fatbin  # cached


@needs_nvcc
@pytest.mark.parametrize("shape", [(10, 64, 1, "int16"), (33, 40000, 7, "int32"), (5, 16, 16, "int16")])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_awkward_shapes_compile(layout, shape):
    assert compile_fatbin(source(layout, *shape), "sm_90")


def kernel_body(src: str) -> str:
    return src[src.rindex("__global__"):]


def test_row_kernel_is_a_warp_per_row_with_a_shuffle_reduction():
    body = kernel_body(source("row"))
    assert "__launch_bounds__(128)" in body, "4 warps of 32 lanes"
    assert body.count("__shfl_down_sync") == 5, "log2(32) shuffle steps"
    # Each lane reads w and idx at ... + threadIdx.x: the warp strides the fan-in.
    assert re.search(r"w_ptr\[[^\]]*threadIdx\.x\)+\]", body)
    assert "if (((int)threadIdx.x) == 0)" in body, "one lane writes the row's result"


def test_col_kernel_reads_x_coalesced_and_weights_warp_uniform():
    body = kernel_body(source("col"))
    signature = body[:body.index("{")]
    assert signature.count("__restrict__") == 5, "no global-memory intermediates: only the five operands"
    coalesced = re.findall(r"xt_ptr\[[^;]*?\* B\)\) \+ \(\(int64_t\)threadIdx\.x\)\)\]", body)
    assert coalesced and len(coalesced) == body.count("xt_ptr["), "consecutive threads read consecutive columns"
    for index in re.findall(r"w_ptr\[([^\]]*)\]", body):
        assert "threadIdx" not in index, "w is the same for the whole warp"
    assert "float acc_local_ptr[4]" in body, "4 output rows accumulated in registers"
    assert "< B)" in body, "batch tail guarded"


def test_half_precision_accumulates_in_float32():
    body = kernel_body(source("col", dtype="float16"))
    assert "float acc_local_ptr" in body and "half" in body


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    from srigl_compile import LoweringError
    from srigl_compile.codegen import cuda_kernels

    monkeypatch.setattr(cuda_kernels.shutil, "which", lambda name: None)
    monkeypatch.setattr(cuda_kernels, "Path", lambda p: type("P", (), {"exists": lambda self: False})())
    with pytest.raises(LoweringError, match="nvcc"):
        cuda_kernels.compile_fatbin("", "sm_90")
