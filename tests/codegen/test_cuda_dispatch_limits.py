"""CUDA choices that need no compiler: shared-memory budgets of the decode and expand kernels, which variants a
shape compiles and a timing run compares, the cost model's thresholds, the records' lookup and the dispatch of a
handle's launches (with stand-in kernels: the numerics of the real ones need a GPU, tests/gpu)."""

import contextlib
import re

import pytest
import torch

from srigl_compile.codegen.cuda_records import (
    CudaRecord,
    default_variants,
    lookup,
    model_dispatch,
    schedule_all,
    write_record,
)
from srigl_compile.codegen.cuda_rules import DecodeRule, decode_fits, expand_rows
from srigl_compile.runtime.cuda_params import CudaDispatch, CudaVariants, DecodeParams
from srigl_compile.runtime.spec import KernelSpec

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_staged_x_fits_96_kib_a_block(dtype):
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    for n_in in (768, 3072, 4096, 11008):
        for tile in (4, 8, 16):
            assert decode_fits(n_in, tile, dtype, DecodeParams()) == (n_in * tile * size <= 96 * 1024), (n_in, tile)
    assert decode_fits(11008, 1, dtype, DecodeParams(stage=False)), "tile 1 through L1 stages nothing"


@pytest.mark.parametrize("n_in, dtype", [(768, "float16"), (3072, "float16"), (3072, "float32"), (4096, "bfloat16"),
                                         (11008, "float16"), (40000, "float32")])
def test_expand_tile_fits_48_kib_of_shared_memory(n_in, dtype):
    spec = KernelSpec(96, n_in, 12, "int16" if n_in <= 32767 else "int32", True, dtype)
    script = schedule_all(default_variants(), spec, lambda layout: f"k_{layout}")["expand"].script()
    size = int(re.search(r'T\.alloc_buffer\(\((\d+),\),( "\w+",)? scope="shared\.dyn"\)', script).group(1))
    rows = expand_rows(n_in, dtype)
    assert size == rows * n_in and 1 <= rows <= 16
    assert size * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype] <= 48 * 1024 or rows == 1, \
        "the zeroed rows of a block stay under the 48 KiB a block gets without opting in"


def test_the_gpu_cases_hold_an_expand_block_reaching_past_the_last_row():
    """tests/gpu runs every regime on ``linear_3072_10`` (under compute-sanitizer in scripts/gpu_check.sh) so that
    the expand kernel's row guard is exercised: its last block of rows must start inside n_out and end past it."""
    from tests.gpu.cases import DTYPES, cases

    layer = cases()["linear_3072_10"][0][0]
    for dtype in DTYPES:
        rows = expand_rows(layer.in_features, str(dtype).removeprefix("torch."))
        assert rows > 1 and layer.out_features % rows != 0, (dtype, rows)


def test_the_built_expand_scatters_only_the_real_fan_in():
    """k 307 padded to 312: the padding repeats a row's last index with a zero weight, so scattering it would
    overwrite the last real weight with zero."""
    spec = KernelSpec(768, 3072, 307, "int16", True, "float16")
    script = schedule_all(default_variants(), spec, lambda layout: f"k_{layout}")["expand"].script()
    assert "// 307" in script and "% 307" in script and "// 312" not in script and "% 312" not in script


def test_default_variants_compile_every_decode_tile_that_fits():
    def tiles(spec):
        funcs = schedule_all(default_variants(), spec, lambda layout: f"k_{layout}")
        return sorted(int(name[6:]) for name in funcs if name.startswith("decode"))

    assert tiles(KernelSpec(768, 3072, 307, "int16", True, "float16")) == [1, 4, 8, 16], "3072 x 16 fp16: 96 KiB"
    assert tiles(KernelSpec(64, 11008, 1100, "int16", True, "float16")) == [1, 4]


def test_the_timing_space_holds_only_variants_the_rule_accepts():
    decode = DecodeRule()
    assert any(not p.stage for p in decode.space(1)) and any(p.stage for p in decode.space(1))
    for tile in (4, 8, 16):
        assert decode.space(tile) and all(p.stage for p in decode.space(tile)), "x through L1: tile 1 only"
    assert all(decode.default(tile) in decode.space(tile) for tile in (1, 4, 8, 16))


def test_col_kernel_puts_row_blocks_on_grid_y():
    """The handle checks ceil(n_out / rows) against 65535 (MAX_GRID_Y) because row blocks are on blockIdx.y."""
    from srigl_compile.codegen.cuda_kernels import col_func, cuda_source
    from srigl_compile.codegen.cuda_rules import ColParams, ColRule

    src = cuda_source(ColRule().apply(col_func(768, 3072, 312, "int16", "float32"), ColParams(64, 4, 4)), "sm_90")
    body = src[src.rindex("__global__"):]
    for index in re.findall(r"w_ptr\[([^\]]*)\]", body):
        assert "blockIdx.y" in index and "blockIdx.x" not in index
    for index in re.findall(r"xt_ptr\[([^;]*?)\]", body):
        assert "blockIdx.x" in index


def test_cost_model_thresholds():
    """decode up to two launches of the largest tile; expand + cuBLAS from the first power of two >= 16 where the
    model prices it below col (values from the model's constants, not measurements)."""
    paper = model_dispatch(768, 3072, 312, "float16")
    assert paper == CudaDispatch((1, 4, 8, 16), 33, 128, "model")
    assert [paper.regime(b) for b in (32, 33, 127, 128)] == ["decode", "col", "col", "dense"]
    assert model_dispatch(768, 3072, 312, "float32") == CudaDispatch((1, 4, 8), 17, 8192, "model"), \
        "fp32 has no tensor-core advantage: col far longer"
    assert model_dispatch(4096, 11008, 1104, "float16") == CudaDispatch((1, 4), 9, 64, "model")
    assert model_dispatch(768, 3072, 1536, "float16").dense_from == 16, "half dense: the GEMM wins at once"


def test_records_missing_a_field_or_of_the_wrong_shape_are_ignored(tmp_path):
    spec = KernelSpec(768, 3072, 307, "int16", True, "float16")
    folder = tmp_path / "cuda" / "sm_90"
    folder.mkdir(parents=True)
    path = folder / f"{spec.measured_record_name()}.json"
    for text in ('{"variants": {"decode": [], "col": {}}}', "[1, 2]", '{"variants": 1, "dispatch": 2}'):
        path.write_text(text)
        record = lookup(spec, "sm_90", tmp_path)
        assert record is not None and record.dispatch.source == "measured NVIDIA H200", text
    other = KernelSpec(64, 256, 24, "int16", True, "float16")
    (folder / f"{other.measured_record_name()}.json").write_text('{"dispatch": {}}')
    assert lookup(other, "sm_90", tmp_path) is None


def test_a_users_record_is_for_its_arch_only(tmp_path):
    spec = KernelSpec(64, 256, 24, "int16", True, "float16")
    record = CudaRecord(default_variants(), CudaDispatch((1, 4), 9, 64, "measured A100"))
    write_record(tmp_path, spec, "sm_80", record, {"gpu": "A100"})
    assert lookup(spec, "sm_80", tmp_path) == record
    assert lookup(spec, "sm_90", tmp_path) is None, "thresholds measured on an A100 are not an H100's"


def test_target_arch_is_always_in_the_fatbin():
    from srigl_compile.codegen.backends.cuda import resolve_cuda_target

    target = resolve_cuda_target({"kind": "cuda", "arch": "sm_90", "fatbin_archs": ["sm_80"]})
    assert target == {"kind": "cuda", "arch": "sm_90", "fatbin_archs": ["sm_80", "sm_90"]}


def test_dispatch_past_the_largest_tile_and_when_col_does_not_fit():
    dispatch = CudaDispatch((1, 4, 8, 16), 33, 128)
    assert [dispatch.decode_tile(m) for m in (1, 2, 5, 16, 17, 32)] == [1, 4, 8, 16, 16, 16], \
        "past the largest tile: chunks of the largest (two launches at most)"
    assert dispatch.regime(40, col_fits=False) == "dense" and dispatch.regime(40) == "col"
    assert CudaDispatch((1,), 3, 0).regime(40, col_fits=False) == "dense", "no dense_from: still not col"
    assert dispatch.regime(127) == "col" and dispatch.regime(128) == "dense"


def _fake_handle(n_out, n_in, dispatch, monkeypatch, rows=1):
    """A CudaLinearHandle whose kernels are torch stand-ins on the CPU (recording their launches)."""
    from srigl_compile.codegen.cuda_rules import ColParams
    from srigl_compile.runtime import cuda_linear

    monkeypatch.setattr(cuda_linear.torch.cuda, "device", lambda device: contextlib.nullcontext())
    spec = KernelSpec(n_out, n_in, 8, "int16", True, "float32")
    variants = CudaVariants(tuple((t, DecodeParams()) for t in dispatch.tiles), ColParams(rows=rows))
    handle = cuda_linear.CudaLinearHandle("fake", spec, {"kind": "cuda", "arch": "sm_90"}, ("sm_90",), variants,
                                          dispatch, "", b"")
    calls = []

    def dense_of(w, idx):
        return torch.zeros(n_out, n_in).scatter_add_(1, idx.long(), w)

    def decode(x, w, idx, bias, out):
        calls.append(("decode", x.shape[0]))
        out.copy_(x @ dense_of(w, idx).t() + bias)

    def col(xt, w, idx, bias, yt):
        calls.append(("col", xt.shape[1]))
        yt.copy_(dense_of(w, idx) @ xt + bias[:, None])

    def expand(w, idx, dense):
        calls.append(("expand", 0))
        dense.copy_(dense_of(w, idx))

    handle._functions = {"decode": {t: decode for t in dispatch.tiles}, "col": col, "expand": expand}
    return handle, calls


@pytest.mark.parametrize("m, expected", [(3, [("decode", 3)]), (20, [("decode", 16), ("decode", 4)]),
                                         (32, [("decode", 16), ("decode", 16)]), (40, [("col", 40)]),
                                         (200, [("expand", 0)])])
def test_launch_runs_the_dispatched_kernels(monkeypatch, m, expected):
    torch.manual_seed(0)
    handle, calls = _fake_handle(24, 32, CudaDispatch((1, 4, 8, 16), 33, 128), monkeypatch)
    w, idx, bias = torch.randn(24, 8), torch.stack([torch.randperm(32)[:8].sort().values for _ in range(24)]), \
        torch.randn(24)
    x = torch.randn(m, 32)
    y = handle.launch(x, [w, idx.short(), bias], 0)
    assert calls == expected
    reference = x @ torch.zeros(24, 32).scatter_add_(1, idx, w).t() + bias
    torch.testing.assert_close(y, reference)
    assert y.shape == (m, 24) and y.is_contiguous(), "the op views it as [..., n_out]"


def test_col_is_used_up_to_65535_row_blocks(monkeypatch):
    dispatch = CudaDispatch((1, 4), 9, 0)
    assert _fake_handle(65535, 16, dispatch, monkeypatch)[0].regime(100) == "col", "the grid's y limit is 65535"
    assert _fake_handle(65536, 16, dispatch, monkeypatch)[0].regime(100) == "dense"
    assert _fake_handle(65536, 16, dispatch, monkeypatch, rows=2)[0].regime(100) == "col"


def _nvcc():
    import shutil
    from pathlib import Path

    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc is not installed")


@contextlib.contextmanager
def _unregistered(*keys):
    from srigl_compile.runtime import registry

    try:
        yield
    finally:
        for key in keys:
            registry._HANDLES.pop(key, None)


def test_a_record_measured_after_a_build_replaces_the_model_dispatch(tmp_path):
    _nvcc()
    from srigl_compile.codegen.backends.cuda import build_cuda

    spec, target = KernelSpec(64, 256, 23, "int16", True, "float16"), {"kind": "cuda", "arch": "sm_90"}
    with _unregistered(spec.key("cuda-sm_90")):
        assert build_cuda(spec, target, cache_dir=tmp_path).dispatch.source == "model"
        measured = CudaDispatch((1, 4, 8, 16), 9, 32, "measured H200")
        write_record(tmp_path, spec, "sm_90", CudaRecord(default_variants(), measured), {"gpu": "H200"})
        assert build_cuda(spec, target, cache_dir=tmp_path).dispatch == measured, \
            "the registered model-dispatch handle is not the record's build"


def test_a_record_naming_tiles_that_do_not_fit_is_restricted_to_the_compiled_ones(tmp_path):
    """8192 fp16 inputs: x tiles of 8 and 16 columns (128 / 256 KiB) do not fit; a record (measured on another
    shape's file, or edited) that names them must not make the handle launch kernels it does not have."""
    _nvcc()
    from srigl_compile.codegen.backends.cuda import build_cuda

    spec = KernelSpec(64, 8192, 819, "int16", True, "float16")
    record = CudaRecord(default_variants(), CudaDispatch((1, 4, 8, 16), 33, 64, "measured H200"))
    write_record(tmp_path, spec, "sm_90", record, {"gpu": "H200"})
    with _unregistered(spec.key("cuda-sm_90")):
        handle = build_cuda(spec, {"kind": "cuda", "arch": "sm_90"}, cache_dir=tmp_path)
    assert [t for t, _ in handle.variants.decode] == [1, 4], "the variants the library holds (decode1, decode4)"
    assert handle.dispatch.tiles == (1, 4) and handle.dispatch.col_from == 9
    assert handle.regime(8) == "decode" and handle.regime(9) == "col" and handle.regime(64) == "dense"
