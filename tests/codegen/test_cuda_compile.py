"""CUDA kernels compile on a machine without a GPU: TVM's CUDA C, then nvcc fatbins for sm_80 and sm_90, with the
thread bindings, memory accesses and register use the schedules promise (ptxas -v, the PTX's load widths).
Numerics and speed need a GPU: tests/gpu and benchmarks/cuda_variants.py."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from srigl_compile.codegen.cuda_kernels import col_func, compile_fatbin, cuda_source, decode_func, expand_func
from srigl_compile.codegen.cuda_records import DECODE_TILES, default_variants, model_dispatch, schedule_all
from srigl_compile.codegen.cuda_rules import ColParams, ColRule, DecodeParams, DecodeRule, decode_fits, expand_rows
from srigl_compile.runtime.spec import KernelSpec

pytestmark = pytest.mark.tvm
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def decode_source(tile=8, params=DecodeParams(), n_out=768, n_in=3072, k=312, index_dtype="int16", dtype="float16",
                  arch="sm_90"):
    sch = DecodeRule().apply(decode_func(n_out, n_in, k, index_dtype, dtype, tile=tile), params)
    assert sch is not None, "the rule declined"
    return cuda_source(sch, arch)


def col_source(params=ColParams(), n_out=768, n_in=3072, k=312, index_dtype="int16", dtype="float32", arch="sm_90"):
    return cuda_source(ColRule().apply(col_func(n_out, n_in, k, index_dtype, dtype), params), arch)


def expand_source(n_out=768, n_in=3072, k_pad=312, k=307, index_dtype="int16", dtype="float16"):
    return cuda_source(expand_func(n_out, n_in, k_pad, k, index_dtype, dtype, rows=expand_rows(n_in, dtype)), "sm_90")


def kernel_body(src: str) -> str:
    return src[src.rindex("__global__"):]


def ptxas(source: str, arch: str = "sm_90") -> str:
    """ptxas -v's report (registers, spills, shared memory) for the kernel."""
    with __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cu"
        path.write_text(source)
        result = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-o", str(path) + ".cubin",
                                 str(path)], capture_output=True, text=True, check=True)
    return result.stderr


def ptx(source: str, arch: str = "sm_90") -> str:
    with __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cu"
        path.write_text(source)
        subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-O3", "-o", str(path) + ".ptx", str(path)], check=True,
                       capture_output=True)
        return Path(str(path) + ".ptx").read_text()


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_kernel_compiles_to_fatbins(dtype, arch, tmp_path):
    funcs = schedule_all(default_variants(), KernelSpec(768, 3072, 307, "int16", True, dtype), lambda layout: f"k_{layout}")
    assert {"col", "expand", "decode1"} <= set(funcs)
    from srigl_compile.codegen._tvm_compat import import_tvm

    tvm = import_tvm()
    module = tvm.IRModule({f"k_{layout}": func for layout, func in funcs.items()})
    source = [m for m in tvm.compile(module, target=tvm.target.Target({"kind": "cuda", "arch": arch}))
              .mod.imports if m.kind == "cuda"][0].inspect_source()
    fatbin = compile_fatbin(source, arch, cache_dir=tmp_path)
    assert len(fatbin) > 1000
    assert compile_fatbin(source, arch, cache_dir=tmp_path) == fatbin  # cached


@needs_nvcc
@pytest.mark.parametrize("shape", [(10, 64, 8, "int16"), (33, 40000, 8, "int32"), (5, 16, 16, "int16"),
                                   (4096, 11008, 1104, "int16")])
def test_awkward_shapes_compile(shape):
    n_out, n_in, k, index = shape
    assert compile_fatbin(decode_source(1, DecodeParams(stage=False), n_out, n_in, k, index), "sm_90")
    assert compile_fatbin(col_source(ColParams(), n_out, n_in, k, index), "sm_90")
    assert compile_fatbin(expand_source(n_out, n_in, k, k - 3, index), "sm_90")


def test_decode_rule_declines_what_does_not_fit():
    big = decode_func(4096, 11008, 1104, "int16", "float16", tile=16)
    assert not decode_fits(11008, 16, "float16", DecodeParams())
    assert DecodeRule().apply(big, DecodeParams()) is None, "11008 x 16 fp16 is 344 KiB of shared memory"
    assert DecodeRule().apply(decode_func(64, 64, 8, "int16", "float16", tile=8), DecodeParams(stage=False)) is None, \
        "only one column is gathered through L1"
    assert DecodeRule().apply(col_func(64, 64, 8, "int16"), DecodeParams()) is None, "not its layout"
    assert ColRule().apply(decode_func(64, 64, 8, "int16", "float16", tile=8), ColParams()) is None


def test_decode_kernel_loads_16_byte_vectors_and_stages_x_in_shared_memory():
    body = kernel_body(decode_source(tile=8, params=DecodeParams(warps=16)))
    assert "extern __shared__" in body and "xs_shared_dyn" in body, "x staged in dynamic shared memory"
    assert re.search(r"\*\(uint4\*\)\(w_local_ptr \+ 0\) = \*\(uint4\*\)\(w_ptr", body), "8 fp16 values: 16 bytes"
    assert re.search(r"\*\(int4\*\)\(idx_local_ptr \+ 0\) = \*\(int4\*\)\(idx_ptr", body), "8 int16 indices"
    assert "float acc_rf_local_ptr[8];" in body, "8 batch columns of float32 partial sums, in registers"
    assert body.count("__shfl_down_sync") == 5, "a log2(32)-step shuffle all-reduce (in a loop over the columns)"
    assert "__launch_bounds__(512)" in body, "16 warps a block, a row each"


def test_batch_one_decode_gathers_x_through_l1():
    body = kernel_body(decode_source(tile=1, params=DecodeParams(warps=8, stage=False)))
    assert "xs_shared" not in body, "no staging for one column"
    assert "float acc_rf_local_ptr[1];" in body
    assert re.search(r"x_ptr\[max\(min\(", body), "gathers x at the (clamped) index"


@needs_nvcc
@pytest.mark.parametrize("tile", [1, 4, 8, 16])
def test_decode_kernels_keep_everything_in_registers(tile):
    params = DecodeParams(warps=8, stage=False) if tile == 1 else DecodeParams(warps=16)
    report = ptxas(decode_source(tile=tile, params=params))
    assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, report
    assert "0 bytes stack frame" in report, f"no local-memory arrays (partial sums stay in registers): {report}"
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert registers <= 128 if tile < 16 else registers <= 255, report


@needs_nvcc
def test_decode_ptx_uses_vector_loads_from_global_memory():
    text = ptx(decode_source(tile=8))
    assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32)", text), "16-byte loads of values and indices"


@needs_nvcc
def test_col_and_expand_kernels_do_not_spill():
    for source in (col_source(), expand_source()):
        report = ptxas(source)
        assert "0 bytes spill stores" in report, report


def test_col_kernel_reads_x_coalesced_and_weights_warp_uniform():
    body = kernel_body(col_source(ColParams(threads=128, rows=4, unroll=4)))
    signature = body[:body.index("{")]
    assert signature.count("__restrict__") == 5, "no global-memory intermediates: only the five operands"
    coalesced = re.findall(r"xt_ptr\[[^;]*?\* B\)\) \+ \(\(int64_t\)threadIdx\.x\)\)\]", body)
    assert coalesced and len(coalesced) == body.count("xt_ptr["), "consecutive threads read consecutive columns"
    for index in re.findall(r"w_ptr\[([^\]]*)\]", body):
        assert "threadIdx" not in index, "w is the same for the whole warp"
    assert "float acc_local_ptr[4]" in body, "4 output rows accumulated in registers"
    assert "< B)" in body, "batch tail guarded"


def test_expand_scatters_only_the_real_fan_in():
    body = kernel_body(expand_source(k_pad=312, k=307))
    assert "307" in body and "__syncthreads()" in body
    assert "312" in body, "rows of the padded operands are 312 long; only their first 307 entries are scattered"


def test_half_precision_accumulates_in_float32():
    for body in (kernel_body(col_source(dtype="float16")), kernel_body(decode_source(dtype="bfloat16"))):
        assert "float acc" in body


def test_model_dispatch_covers_every_batch_with_one_regime():
    for n_out, n_in, dtype in [(768, 3072, "float16"), (3072, 768, "float32"), (11008, 4096, "bfloat16")]:
        dispatch = model_dispatch(n_out, n_in, n_in // 10 // 8 * 8, dtype)
        assert dispatch.tiles and set(dispatch.tiles) <= set(DECODE_TILES)
        regimes = [dispatch.regime(b) for b in range(1, 20000, 7)]
        assert regimes[0] == "decode" and set(regimes) <= {"decode", "col", "dense"}
        order = {"decode": 0, "col": 1, "dense": 2}
        assert [order[r] for r in regimes] == sorted(order[r] for r in regimes), "regimes follow the batch size"
        assert dispatch.decode_tile(1) == 1 and dispatch.decode_tile(3) == min(t for t in dispatch.tiles if t >= 3)


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    from srigl_compile import LoweringError
    from srigl_compile.codegen import cuda_kernels

    monkeypatch.setattr(cuda_kernels.shutil, "which", lambda name: None)
    monkeypatch.setattr(cuda_kernels, "Path", lambda p: type("P", (), {"exists": lambda self: False})())
    with pytest.raises(LoweringError, match="nvcc"):
        cuda_kernels.compile_fatbin("", "sm_90")
