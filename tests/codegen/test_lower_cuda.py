"""lower(target="cuda") on a machine without a GPU: kernels are built (TVM CUDA C + nvcc fatbins), saved and
loaded; running them is a clear error. Numerics on a GPU are in tests/gpu (skipped here)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from srigl_compile import (
    CheckpointError,
    DeviceError,
    LoweringError,
    SRigLConfig,
    UnsupportedTargetError,
    load_lowered,
    lower,
    save_lowered,
    sparse_layers,
    sparsify,
)
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.runtime import registry
from tests.gpu.cases import TARGET, cases

pytestmark = [pytest.mark.tvm, pytest.mark.skipif(
    shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(), reason="nvcc is not installed")]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")


@pytest.fixture(scope="module")
def built():
    masked = cases()["residual_cnn"][0]
    return masked, lower(masked, target=TARGET)


def handles(model):
    from srigl_compile.runtime.registry import get_handle

    return [get_handle(m.kernel_key) for m in model.modules()
            if isinstance(m, (LoweredLinear, LoweredConv)) and m.n_active]


def test_every_sparse_layer_gets_a_cuda_kernel(built):
    masked, lowered = built
    layers = [m for m in lowered.modules() if isinstance(m, (LoweredLinear, LoweredConv))]
    assert len(layers) == len(list(sparse_layers(masked))) and all(m.kernel_key.endswith("@cuda-sm_90") for m in layers if m.n_active)
    for handle in handles(lowered):
        assert handle.device_type == "cuda" and handle.fatbin_archs == ("sm_90",)
        assert len(handle.fatbin) > 1000 and "__global__" in handle.source
        assert handle.k_pad % 8 == 0 and handle.k_pad - handle.k < 8


def test_default_cuda_target_covers_a100_and_h100_without_a_gpu():
    from srigl_compile.codegen.cuda_kernels import gencode_flags
    from srigl_compile.codegen.target import resolve_target

    if not torch.cuda.is_available():
        assert resolve_target("cuda") == {"kind": "cuda", "arch": "sm_80", "fatbin_archs": ["sm_80", "sm_90"]}
    assert gencode_flags(["sm_90", "sm_80"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                 "-gencode=arch=compute_90,code=sm_90",
                                                 "-gencode=arch=compute_80,code=compute_80"], "+ PTX for newer GPUs"


@pytest.mark.parametrize("target", [{"kind": "cuda"}, {"kind": "cuda", "arch": "90"},
                                    {"kind": "cuda", "arch": "sm_90", "fatbin_archs": ["compute_90"]},
                                    {"kind": "cuda", "arch": "sm_90", "max_threads": 1024}])
def test_bad_cuda_targets_are_clear_errors(target):
    from srigl_compile.codegen.target import resolve_target

    with pytest.raises(UnsupportedTargetError, match="arch|keys"):
        resolve_target(target)


def test_dtypes_and_options_cuda_does_not_have():
    masked = cases()["mlp_ablated"][0]
    half = lower(masked, target=TARGET, dtype=torch.float16)
    layer = half[0]
    assert layer.values.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.indices.dtype == torch.int16, "indices keep their integer type"
    assert all(h.dtype == "float16" for h in handles(half))
    with pytest.raises(LoweringError, match="float16"):
        lower(masked, target="llvm", dtype=torch.float16)
    with pytest.raises(LoweringError, match="float64"):
        lower(masked, target=TARGET, dtype=torch.float64)
    with pytest.raises(LoweringError, match="tune=True"):
        lower(masked, target=TARGET, tune=True)


@no_cuda
def test_running_without_cuda_is_a_clear_error(built):
    from srigl_compile.runtime.cuda_linear import CudaUnavailableError

    _, lowered = built
    with pytest.raises(CudaUnavailableError, match="no usable CUDA device.*target='llvm'") as info:
        lowered(torch.randn(2, 3, 16, 16))
    assert isinstance(info.value, DeviceError)
    with pytest.raises(CudaUnavailableError):
        handles(lowered)[0].functions()


def test_save_load_carries_fatbins_and_their_sources(built, tmp_path):
    _, lowered = built
    save_lowered(lowered, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "kernels" / "manifest.json").read_text())
    entries = manifest["kernels"].values()
    assert entries and all(e["device"] == "cuda" and e["fatbin_archs"] == ["sm_90"] for e in entries)
    for entry in entries:
        library = (tmp_path / "m" / "kernels" / entry["file"]).read_bytes()
        source = (tmp_path / "m" / "kernels" / entry["source"]).read_bytes()
        assert source in library, "the library's CUDA source is the one the fatbin was built from"
    built_handles, registered = handles(lowered), dict(registry._HANDLES)
    for before, after in zip(built_handles, handles(load_lowered(tmp_path / "m")), strict=True):
        assert after is before, "the same variant, registered here already: reused, not registered beside"
    registry._HANDLES.clear()  # (as in a fresh process)
    try:
        for before, after in zip(built_handles, handles(load_lowered(tmp_path / "m")), strict=True):
            assert after is not before and after.key == before.key
            assert after.fatbin == before.fatbin and after.source == before.source
    finally:
        registry._HANDLES.clear()
        registry._HANDLES.update(registered)
    fatbin = tmp_path / "m" / "kernels" / next(iter(entries))["fatbin"]
    fatbin.write_bytes(fatbin.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="fatbin"):
        load_lowered(tmp_path / "m")


def test_the_loader_callback_answers_with_the_prebuilt_fatbin(built):
    import tvm_ffi

    from srigl_compile.runtime.cuda_linear import register_fatbin

    handle = handles(built[1])[0]
    register_fatbin(handle.source, handle.fatbin)
    callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(callback(handle.source)) == handle.fatbin
    with pytest.raises(Exception, match="no prebuilt fatbin"):
        callback(handle.source + "// changed\n")


def test_prebuilt_kernels_need_no_compiler(built, monkeypatch):
    """What the GPU machine does: the kernels are registered (loaded), so lower() compiles nothing."""
    from srigl_compile.codegen import _tvm_compat

    monkeypatch.setattr(_tvm_compat, "import_tvm", lambda: pytest.fail("compiled although the kernels exist"))
    masked, lowered = built
    again = lower(masked, target=TARGET)
    assert [h.key for h in handles(again)] == [h.key for h in handles(lowered)]


def test_paper_layer_fatbin_is_deterministic_and_cached(tmp_path):
    from srigl_compile.runtime import registry

    masked = sparsify(nn.Sequential(nn.Linear(3072, 768, bias=False)),
                      SRigLConfig(sparsity=0.95, distribution="uniform"))
    first = handles(lower(masked, target=TARGET, cache_dir=tmp_path))[0]
    registry._HANDLES.pop(first.key)
    second = handles(lower(masked, target=TARGET, cache_dir=tmp_path))[0]
    assert second is not first and second.fatbin == first.fatbin and second.source == first.source
    digest = hashlib.sha256(first.fatbin).hexdigest()
    assert any(hashlib.sha256(p.read_bytes()).hexdigest() == digest for p in (tmp_path / "fatbins").iterdir())
