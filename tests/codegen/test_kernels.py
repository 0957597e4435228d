"""The TVM condensed-linear kernels: numerics of both layouts, the torch op in every mode, rules, tuning, save/load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")

from srigl_compile.codegen.backends.llvm import build_condensed_conv, build_condensed_linear  # noqa: E402
from srigl_compile.codegen.cpu_target import (  # noqa: E402
    check_llvm_target,
    has_bit_extract,
    host_llvm_target,
    vector_registers,
)
from srigl_compile.codegen.kernels import row_kernel  # noqa: E402
from srigl_compile.codegen.rules import ColParams, RowParams, RowRule  # noqa: E402
from srigl_compile.codegen.tuning import TuningRecords, select_params  # noqa: E402
from srigl_compile.errors import LoweringError, UnsupportedTargetError  # noqa: E402
from srigl_compile.runtime import registry  # noqa: E402
from srigl_compile.runtime.checks import KernelDeviceError, KernelDtypeError  # noqa: E402
from srigl_compile.runtime.kernel_io import KernelFileError, export_kernels, load_kernels  # noqa: E402
from srigl_compile.runtime.linear_op import condensed_linear  # noqa: E402
from srigl_compile.runtime.spec import KernelSpec, target_key  # noqa: E402
from tests.helpers import make_layer, reference  # noqa: E402

OP = torch.ops.srigl_compile.tvm_condensed_linear.default
ROW_ONLY, COL_ONLY = 10**9, 1  # col_threshold values forcing one layout

# (n_out, n_in, k, index dtype, bias): the paper's layer (k = 307, prime), k = n_in, k = 1, small prime k.
SHAPES = [(768, 3072, 307, "int16", True), (33, 61, 61, "int32", False), (5, 7, 1, "int16", True),
          (64, 100, 13, "int32", True)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "o{}_i{}_k{}_{}_{}".format(*s))
def layer(request):
    shape = request.param
    handle = build_condensed_linear(*shape)
    values, indices, bias = make_layer(*shape)
    return handle, values, indices, bias


@pytest.mark.parametrize("batch", [1, 2, 37, 197, 256])
@pytest.mark.parametrize("threshold", [ROW_ONLY, COL_ONLY, 16], ids=["row", "col", "auto"])
def test_numerics_both_layouts(layer, batch, threshold):
    handle, values, indices, bias = layer
    packed = handle.pack(values, indices)
    x = torch.randn(batch, handle.n_in)
    torch.testing.assert_close(handle(x, *packed, bias, col_threshold=threshold), reference(x, values, indices, bias),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [64, 150, 600])
def test_fused_pack_kernel_equals_reference(layer, batch, monkeypatch):
    """From enough tiles a thread, the col kernel packs each tile inside its task (no separate pack kernel)."""
    handle, values, indices, bias = layer
    assert handle.fused_fn is not None
    monkeypatch.setattr(handle, "fused_from_tiles", 1)

    def no_separate_pack(*args):
        raise AssertionError("the fused path ran the separate pack kernel")

    monkeypatch.setattr(handle, "pack_fn", no_separate_pack)
    packed = handle.pack(values, indices)
    x = torch.randn(batch, handle.n_in)
    y = handle(x, *packed, bias, col_threshold=COL_ONLY)
    assert y.shape == (batch, handle.n_out) and y.is_contiguous()
    torch.testing.assert_close(y, reference(x, values, indices, bias), rtol=1e-4, atol=1e-4)


def test_fused_path_needs_enough_tiles_and_a_library_that_has_it(monkeypatch):
    """The fused kernel runs from ``fused_from_tiles`` full tiles; libraries saved before it existed load and run
    on the separate pack."""
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.kernels import pack_kernel
    from srigl_compile.codegen.rules import RULES
    from srigl_compile.codegen.tuning import _build, _scheduled, mid_params, pack_func
    from srigl_compile.runtime.llvm_linear import FUSED_TILES_PER_THREAD, LlvmLinearHandle

    target = host_llvm_target()
    shape, row, col = KernelSpec(5, 7, 8, "int16", True), RowParams(vec=8), ColParams(kin=8)
    old = _build({shape.symbol("row"): _scheduled(shape, "row", row, target),
                  shape.symbol("col"): _scheduled(shape, "col", col, target),
                  shape.symbol("pack"): RULES["pack"].apply(pack_func(shape, col.lanes), target).mod["main"],
                  shape.symbol("mid"): _scheduled(shape, "col", mid_params(col), target).with_attr(
                      "global_symbol", shape.symbol("mid")),
                  shape.symbol("packmid"): RULES["pack"].apply(pack_kernel(7, 8, shape.symbol("packmid")),
                                                               target).mod["main"]}, target)
    handle = LlvmLinearHandle("old-library", KernelSpec(5, 7, 1, "int16", True), target, row, col, old.mod)
    assert handle.fused_fn is None
    values, indices, bias = make_layer(5, 7, 1, "int16", True)
    x = torch.randn(64 * 40, 7)
    torch.testing.assert_close(handle.launch(x, list(handle.pack(values, indices)) + [bias], COL_ONLY),
                               reference(x, values, indices, bias), rtol=1e-5, atol=1e-5)
    current = build_condensed_linear(5, 7, 1, "int16", True)
    assert current.fused_fn is not None and current.fused_from_tiles >= FUSED_TILES_PER_THREAD
    operands = list(current.pack(values, indices)) + [bias]

    def fused_ran(*args):
        raise RuntimeError("fused")

    monkeypatch.setattr(current, "fused_fn", fused_ran)
    below = torch.randn(current.lanes * (current.fused_from_tiles - 1) + 5, 7)
    torch.testing.assert_close(current.launch(below, operands, COL_ONLY), reference(below, values, indices, bias),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fused"):
        current.launch(torch.randn(current.lanes * current.fused_from_tiles, 7), operands, COL_ONLY)


def test_tile_buffer_reused_across_batches_leaks_nothing(layer):
    """The packed tiles live in a per-thread scratch buffer: a smaller batch after a larger one must see zero
    padding rows, not the larger batch's data, and earlier results must stay as they were."""
    handle, values, indices, bias = layer
    packed = handle.pack(values, indices)
    calls = [(torch.randn(batch, handle.n_in), threshold) for batch, threshold in
             ((200, COL_ONLY), (70, COL_ONLY), (5, COL_ONLY), (13, ROW_ONLY // 2), (3, 16))]
    results = [(x, handle(x, *packed, bias, col_threshold=threshold)) for x, threshold in calls]
    for x, y in results:
        torch.testing.assert_close(y, reference(x, values, indices, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_in, index_dtype", [(2**15, "int16"), (70_000, "int32")])
def test_row_kernel_index_words_reach_the_widest_indices(n_in, index_dtype):
    """The row kernel shifts indices out of 64-bit words: every field of a word, up to the dtype's largest index
    (int16: 32767; int32: beyond 2**16, so the upper half-word matters), must come out exact."""
    gen = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(n_in, generator=gen)[:15].sort().values for _ in range(6)])
    indices[:, -1] = n_in - 1  # the top index lands in a word's high bits after padding to k = 16
    values = torch.randn(6, 15, generator=gen)
    handle = build_condensed_linear(6, n_in, 15, index_dtype, False)
    packed = handle.pack(values, indices)
    for batch in (1, 2):
        x = torch.randn(batch, n_in, generator=gen)
        torch.testing.assert_close(handle(x, *packed, None, col_threshold=ROW_ONLY),
                                   reference(x, values, indices, None), rtol=1e-5, atol=1e-5)


HOST_HAS_BMI = "bmi1" in open("/proc/cpuinfo").read()
NO_BMI = {"kind": "llvm", "mcpu": "x86-64-v2", "num-cores": 2}  # SSE4.2, no bextr: the shift path


@pytest.mark.parametrize("index_dtype", ["int16", "int32"])
@pytest.mark.parametrize("bmi", [True, False], ids=["bextr", "shifts"])
def test_row_kernel_both_index_extractions_are_exact(index_dtype, bmi):
    """Indices come out of their words with bextr where the CPU has BMI1, else with shifts and masks: both
    must give every field of a word exactly (the top index sits in a word's high bits), and the code must use
    the instruction the target was chosen for."""
    if bmi and not HOST_HAS_BMI:
        pytest.skip("this CPU has no BMI1")
    target = host_llvm_target() if bmi else NO_BMI
    assert has_bit_extract(target) is bmi
    n_in = 2**15 if index_dtype == "int16" else 70_000
    gen = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(n_in, generator=gen)[:24].sort().values for _ in range(5)])
    indices[:, -1] = n_in - 1
    values = torch.randn(5, 24, generator=gen)
    handle = build_condensed_linear(5, n_in, 24, index_dtype, True, target)
    bias = torch.randn(5, generator=gen)
    packed = handle.pack(values, indices)
    x = torch.randn(1, n_in, generator=gen)
    torch.testing.assert_close(handle(x, *packed, bias, col_threshold=ROW_ONLY),
                               reference(x, values, indices, bias), rtol=1e-5, atol=1e-5)
    assert ("bextr" in handle.module.inspect_source("asm")) is bmi


def test_row_kernel_needs_whole_index_words():
    operands = [(str(b.name), [str(d) for d in b.shape], str(b.dtype)) for b in row_kernel(4, 8, 12, "int16").params]
    # 12 int16 indices a row are read as 3 int64 words
    assert operands == [("x", ["B", "8"], "float32"), ("w", ["4", "12"], "float32"), ("idx", ["4", "3"], "int64"),
                        ("bias", ["4"], "float32"), ("y", ["B", "4"], "float32")]
    with pytest.raises(ValueError, match="multiple of 4"):
        row_kernel(4, 8, 13, "int16")
    with pytest.raises(ValueError, match="multiple of 2"):
        row_kernel(4, 8, 7, "int32")


def test_unpacked_operands_leading_dims_and_empty_batch(layer):
    handle, values, indices, bias = layer
    x = torch.randn(2, 3, handle.n_in)
    torch.testing.assert_close(handle(x, values, indices.int(), bias), reference(x, values, indices, bias),
                               rtol=1e-4, atol=1e-4)
    assert handle(torch.randn(0, handle.n_in), values, indices, bias).shape == (0, handle.n_out)


def test_pack_pads_k_with_zero_weights_and_sorted_indices():
    handle = build_condensed_linear(5, 7, 1, "int16", True)
    values, indices, _ = make_layer(5, 7, 1, "int16", True)
    packed_values, packed_indices = handle.pack(values, indices)
    assert packed_values.shape == (5, 8) and packed_indices.dtype == torch.int16
    assert (packed_values[:, 1:] == 0).all() and (packed_indices.diff(dim=1) >= 0).all()
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        handle.pack(values, indices + 7)


def test_typed_errors_for_device_dtype_width_and_bias():
    handle = build_condensed_linear(5, 7, 1, "int16", True)
    values, indices, bias = make_layer(5, 7, 1, "int16", True)
    with pytest.raises(KernelDeviceError, match=r"\.cpu\(\)") as err:
        condensed_linear(torch.empty(2, 7, device="meta"), values, indices, bias, handle.key)
    assert isinstance(err.value, ValueError)
    with pytest.raises(KernelDtypeError, match=r"\.float\(\)") as err:
        condensed_linear(torch.randn(2, 7, dtype=torch.float64), values, indices, bias, handle.key)
    assert isinstance(err.value, TypeError)
    with pytest.raises(ValueError, match="7 input features"):
        handle(torch.randn(2, 8), values, indices, bias)
    with pytest.raises(ValueError, match="has_bias=True"):
        handle(torch.randn(2, 7), values, indices, None)


class Layer(torch.nn.Module):
    def __init__(self, handle, values, indices, bias):
        super().__init__()
        packed = handle.pack(values, indices)
        self.register_buffer("values", packed[0])
        self.register_buffer("indices", packed[1])
        self.register_buffer("bias", bias)
        self.key = handle.key

    def forward(self, x):
        return torch.relu(condensed_linear(x, self.values, self.indices, self.bias, self.key))


@pytest.fixture(scope="module")
def small_model():
    handle = build_condensed_linear(64, 100, 13, "int32", True)
    values, indices, bias = make_layer(64, 100, 13, "int32", True)
    return Layer(handle, values, indices, bias), (values, indices, bias)


def test_opcheck(small_model):
    model, _ = small_model
    for batch, bias in [(1, model.bias), (40, model.bias)]:
        torch.library.opcheck(OP, (torch.randn(batch, 100), model.values, model.indices, bias, model.key, 16))
    nobias = build_condensed_linear(33, 61, 61, "int32", False)
    values, indices = nobias.pack(*make_layer(33, 61, 61, "int32", False)[:2])
    torch.library.opcheck(OP, (torch.randn(3, 61), values, indices, None, nobias.key, 16))


def test_fx_export_and_compile_keep_one_op_node(small_model):
    model, (values, indices, bias) = small_model
    x = torch.randn(20, 100)
    expected = torch.relu(reference(x, values, indices, bias))
    traced = torch.fx.symbolic_trace(model)
    assert any(n.target is torch.ops.srigl_compile.tvm_condensed_linear for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-4)
    exported = torch.export.export(model, (x,))
    assert any(n.target is OP for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_target_names_the_cpu_and_code_uses_avx2():
    target = host_llvm_target()
    assert target["kind"] == "llvm" and target["mcpu"] not in ("", "generic", "native")
    with pytest.raises(UnsupportedTargetError, match="native"):
        check_llvm_target({"kind": "llvm", "mcpu": "native"})
    with pytest.raises(UnsupportedTargetError):
        check_llvm_target({"kind": "cuda"})
    handle = build_condensed_linear(64, 100, 13, "int32", True)
    if "avx2" in open("/proc/cpuinfo").read():
        asm = handle.module.inspect_source("asm")
        assert vector_registers(asm)["ymm"] > 0 and "vfmadd" in asm


@pytest.mark.skipif("avx512f" in open("/proc/cpuinfo").read(), reason="this CPU runs AVX-512 code")
def test_kernels_for_a_cpu_with_instructions_this_one_lacks_refuse_to_run(tmp_path):
    """Calling them would kill the interpreter with SIGILL: a typed error instead, and tuning (which runs them)
    is refused; an mcpu LLVM does not know is an error, not a silent generic build."""
    from srigl_compile.errors import LoweringError
    from srigl_compile.runtime.conv_op import condensed_conv2d

    foreign = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
    handle = build_condensed_linear(8, 16, 4, "int16", True, foreign)
    assert "avx512f" in handle.missing_features
    values, indices, bias = make_layer(8, 16, 4, "int16", True)
    with pytest.raises(KernelDeviceError, match="skylake-avx512"):
        handle(torch.randn(2, 16), *handle.pack(values, indices), bias)
    conv = build_condensed_conv(8, 36, 4, "int16", False, foreign)
    with pytest.raises(KernelDeviceError, match="crash"):
        condensed_conv2d(torch.randn(1, 4, 5, 5), *conv.pack(values, indices.long() % 36), None, conv.key, (3, 3),
                         (1, 1), (1, 1))
    with pytest.raises(LoweringError, match="tune"):
        build_condensed_linear(8, 16, 4, "int16", True, foreign, tune=True, cache_dir=tmp_path)
    with pytest.raises(UnsupportedTargetError, match="pentium9000"):
        check_llvm_target({"kind": "llvm", "mcpu": "pentium9000"})


def test_tuning_records_written_and_reread(tmp_path, caplog):
    target = host_llvm_target()
    shape = KernelSpec(48, 96, 16, "int16", True)
    space = {"row": [RowParams(8, 16, 4), RowParams(16, 32, 16)], "col": [ColParams(32, 8, 1, 32),
                                                                           ColParams(16, 4, 2, 64)],
             "offset": [ColParams(16, 8, 2, 32), ColParams(32, 4, 1, 64)]}  # (96 = 32 channels x 3x3 kernel)
    chosen = {layout: select_params(shape, layout, target, tune=True, cache_dir=tmp_path, space=space[layout],
                                    progress=False) for layout in space}
    for layout in space:
        assert chosen[layout] in space[layout]
        key = shape.record_key(layout, target_key(target))
        record = json.loads(TuningRecords(tmp_path).path(key).read_text())
        assert record["key"] == key and len(record["candidates"]) == 2
        assert select_params(shape, layout, target, tune=False, cache_dir=tmp_path) == chosen[layout]
    handle = build_condensed_linear(48, 96, 11, "int16", True, target, cache_dir=tmp_path)  # k 11 -> 16
    assert (handle.row_params, handle.col_params) == (chosen["row"], chosen["col"])
    assert build_condensed_conv(48, 96, 11, "int16", True, target, cache_dir=tmp_path).params == chosen["offset"]
    TuningRecords(tmp_path).path(shape.record_key("row", target_key(target))).write_text("{not json")
    assert select_params(shape, "row", target, cache_dir=tmp_path) == RowRule().default(16)
    assert "ignoring tuning record" in caplog.text


def test_export_load_round_trip_and_corrupt_files(tmp_path, small_model):
    model, (values, indices, bias) = small_model
    handles = [registry.get_handle(model.key), build_condensed_linear(5, 7, 1, "int16", True)]
    export_kernels(handles, tmp_path / "k")
    saved = dict(registry._HANDLES)
    registry._HANDLES.clear()  # as in a fresh process
    try:
        loaded = load_kernels(tmp_path / "k")
    finally:
        registry._HANDLES.update({key: h for key, h in saved.items() if key not in registry._HANDLES})
    assert set(loaded) == {h.key for h in handles}
    x = torch.randn(30, 100)
    torch.testing.assert_close(model(x), torch.relu(reference(x, values, indices, bias)), rtol=1e-4, atol=1e-4)
    export_kernels(loaded.values(), tmp_path / "again")  # loaded kernels can be saved again
    assert len(load_kernels(tmp_path / "again")) == 2

    # (a copy: the libraries in "k" are loaded, and truncating a mapped library kills the process with SIGBUS
    # when its pages are next touched, at the latest when the interpreter exits)
    corrupt = Path(shutil.copytree(tmp_path / "k", tmp_path / "corrupt"))
    library = corrupt / json.loads((corrupt / "manifest.json").read_text())["kernels"][model.key]["file"]
    library.write_bytes(library.read_bytes()[:1000])
    with pytest.raises(KernelFileError, match="does not match"):
        load_kernels(corrupt)
    (corrupt / "manifest.json").write_text("{}")
    with pytest.raises(KernelFileError, match="not a"):
        load_kernels(corrupt)
    with pytest.raises(KernelFileError, match="no manifest"):
        load_kernels(tmp_path / "missing")


def test_missing_kernel_key_names_the_fix():
    with pytest.raises(LoweringError, match="load_lowered"):  # the user-level fix: lowered models travel with it
        condensed_linear(torch.randn(1, 4), torch.randn(2, 8), torch.zeros(2, 8, dtype=torch.int32), None, "nope")


def test_codegen_package_import_does_not_import_tvm():
    code = ("import sys, srigl_compile, srigl_compile.codegen.target, srigl_compile.codegen.backends, "
            "srigl_compile.runtime.kernel_io, srigl_compile.runtime.linear_op, srigl_compile.nn.lowered; "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
