"""Tuning records for CUDA shapes: what a GPU timing run (benchmarks/cuda_variants.py) turns into, and what
lower(target="cuda") then compiles and dispatches. The timing results here are made up (no GPU); the maths of
choosing variants and thresholds from them is what is tested."""

import json
import sys
from pathlib import Path

import pytest

from srigl_compile.codegen.cuda_records import default_variants, lookup, model_dispatch
from srigl_compile.codegen.cuda_rules import ColParams, DecodeParams
from srigl_compile.runtime.cuda_params import CudaDispatch, CudaVariants
from srigl_compile.runtime.spec import KernelSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytestmark = pytest.mark.tvm


def fake_results(tmp_path: Path) -> Path:
    variants = [{"symbol": "d1a", "kind": "decode", "tile": 1, "params": {"warps": 8, "vec": 8, "stage": False}},
                {"symbol": "d1b", "kind": "decode", "tile": 1, "params": {"warps": 4, "vec": 4, "stage": True}},
                {"symbol": "d8", "kind": "decode", "tile": 8, "params": {"warps": 16, "vec": 8, "stage": True}},
                {"symbol": "ca", "kind": "col", "tile": 0, "params": {"threads": 64, "rows": 1, "unroll": 8}},
                {"symbol": "cb", "kind": "col", "tile": 0, "params": {"threads": 128, "rows": 4, "unroll": 4}},
                {"symbol": "v_expand", "kind": "expand", "tile": 0, "params": {"rows": 8}}]
    manifest = {"name": "s", "n_out": 768, "n_in": 3072, "k_pad": 312, "dtype": "float16", "variants": variants}
    timings = [{"batch": 1, "us": {"dense": 6.0, "d1a": 2.0, "d1b": 3.0}},
               {"batch": 8, "us": {"dense": 6.0, "d8": 3.0, "ca": 9.0, "cb": 20.0, "v_expand": 12.0}},
               {"batch": 16, "us": {"dense": 6.0, "ca": 5.0, "cb": 20.0, "v_expand": 12.0}},
               {"batch": 256, "us": {"dense": 7.0, "ca": 30.0, "cb": 60.0, "v_expand": 10.0}}]
    path = tmp_path / "cuda_variants.json"
    path.write_text(json.dumps({"environment": {"gpu": "H200"}, "manifest": {"s": manifest},
                                "results": [{"name": "s", "timings": timings}]}))
    return path


def test_records_pick_the_fastest_variants_and_the_crossovers(tmp_path):
    import cuda_variants

    written = cuda_variants.records(fake_results(tmp_path), tmp_path / "cache")
    assert len(written) == 1
    record = lookup(KernelSpec(768, 3072, 312, "int16", True, "float16"), "sm_90", tmp_path / "cache")
    assert record.variants.decode == ((1, DecodeParams(8, 8, False)), (8, DecodeParams(16, 8, True)))
    assert record.variants.col == ColParams(64, 1, 8), "fastest summed over the col batches"
    assert record.dispatch == CudaDispatch((1, 8), 16, 256, "measured H200"), \
        "col from 16 (beats no decode there), expand + cuBLAS from 256 (10 < 30)"
    assert lookup(KernelSpec(768, 3072, 312, "int16", True, "float32"), "sm_90", tmp_path / "cache") is None, \
        "another dtype: no record"


def test_a_corrupt_record_falls_back_to_a_shipped_one_or_the_defaults(tmp_path):
    folder = tmp_path / "cuda" / "sm_90"
    folder.mkdir(parents=True)
    (folder / "o768_i3072_k320_float16.json").write_text("{not json")
    assert lookup(KernelSpec(768, 3072, 320, "int16", True, "float16"), "sm_90", tmp_path) is None
    (folder / "o768_i3072_k312_float16.json").write_text("{not json")
    shipped = lookup(KernelSpec(768, 3072, 312, "int16", True, "float16"), "sm_90", tmp_path)
    assert shipped is not None and shipped.dispatch.source == "measured NVIDIA H200"


def test_the_shipped_h200_record_of_the_paper_layer_is_used_unless_the_user_has_one(tmp_path):
    paper_fp16 = KernelSpec(768, 3072, 307, "int16", True, "float16")  # 90% of 3072: k 307, padded to 312
    record = lookup(paper_fp16, "sm_90", tmp_path / "empty")
    assert record.dispatch == CudaDispatch((1, 2, 4, 8, 16), 16, 8, "measured NVIDIA H200")
    regimes = {batch: record.dispatch.regime(batch) for batch in (1, 8, 15, 16, 32, 4096)}
    assert regimes == {1: "decode", 8: "decode", 15: "decode", 16: "dense", 32: "dense", 4096: "dense"}, \
        "H200: decode 7.9 us against expand + cuBLAS 15.3 at batch 8, 20.0 against 15.8 at 16; col never won"
    assert lookup(paper_fp16, "sm_80", tmp_path / "empty") is None, "records are per arch"
    assert lookup(KernelSpec(768, 3072, 307, "int16", True, "float32"), "sm_90", tmp_path / "empty") is None
    import cuda_variants

    cuda_variants.records(fake_results(tmp_path), tmp_path / "mine")  # the user's own measurement wins
    assert lookup(paper_fp16, "sm_90", tmp_path / "mine").dispatch.source == "measured H200"


def test_variants_and_dispatch_round_trip():
    variants = default_variants()
    assert CudaVariants.from_dict(json.loads(json.dumps(variants.to_dict()))) == variants
    dispatch = model_dispatch(768, 3072, 312, "float16")
    assert CudaDispatch.from_dict(json.loads(json.dumps(dispatch.to_dict()))) == dispatch
    assert dispatch.restricted_to((1, 4)).col_from == 9 and dispatch.restricted_to(()).regime(1) != "decode"


def test_lower_uses_a_record_for_its_shape(tmp_path, monkeypatch):
    import shutil

    import torch.nn as nn

    from srigl_compile import SRigLConfig, lower, sparsify
    from srigl_compile.runtime.registry import get_handle

    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc is not installed")
    import cuda_variants

    cuda_variants.records(fake_results(tmp_path), tmp_path / "cache")
    masked = sparsify(nn.Sequential(nn.Linear(3072, 768)), SRigLConfig(sparsity=0.9, distribution="uniform", seed=5))
    import torch

    lowered = lower(masked, target={"kind": "cuda", "arch": "sm_90"}, dtype=torch.float16, cache_dir=tmp_path / "cache")
    handle = get_handle(lowered[0].kernel_key)
    assert handle.dispatch.source == "measured H200" and handle.dispatch.tiles == (1, 8)
    assert [handle.regime(b) for b in (1, 8, 15, 16, 255, 256)] == ["decode"] * 3 + ["col", "col", "dense"]
