"""Targets, configs and kernel names: the target parser, per-target configs given to lower(), and the names a
KernelSpec derives (their formats are in saved manifests, libraries and tuning records, so they must not drift)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import LoweringError, SRigLConfig, UnsupportedTargetError, lower, sparsify
from srigl_compile.codegen.backends import BACKENDS, CudaConfig, LlvmConfig
from srigl_compile.codegen.target import parse_target
from srigl_compile.runtime.spec import KernelSpec


@pytest.mark.parametrize("target, parsed", [
    ("llvm", ("llvm", None)), ("cuda", ("cuda", None)),
    ("cuda:sm_90", ("cuda", {"kind": "cuda", "arch": "sm_90"})),
    ({"kind": "llvm", "mcpu": "znver3"}, ("llvm", {"kind": "llvm", "mcpu": "znver3"}))])
def test_the_parser_reads_names_arch_suffixes_and_dicts(target, parsed):
    assert parse_target(target) == parsed


@pytest.mark.parametrize("target", ["tpu", "", 3, {"kind": "opencl"}, "rocm:gfx90a"])
def test_unknown_kinds_list_the_backends(target):
    with pytest.raises(UnsupportedTargetError, match="'llvm': .*'cuda': "):
        parse_target(target)


def test_each_backend_declares_its_decisions():
    assert {kind: (b.dtypes, b.conv_route) for kind, b in BACKENDS.items()} == {
        "llvm": (("float32",), "direct"), "cuda": (("float32", "float16", "bfloat16"), "im2col")}


def test_kernel_names_keep_their_formats():
    spec = KernelSpec(768, 3072, 307, "int16", True)
    assert spec.k_pad == 312
    assert spec.key("kind=llvm,mcpu=znver3,num-cores=2") == "o768_i3072_k307_int16_b@kind=llvm,mcpu=znver3,num-cores=2"
    assert spec.symbol("row") == "srigl_row_o768_i3072_k312_int16_b"
    assert spec.record_key("col", "kind=llvm") == "condensed_linear|col|o768|i3072|k312|int16|bias|kind=llvm"
    conv = KernelSpec(64, 576, 58, "int16", False, op="conv", lanes=49)
    assert conv.key("t") == "conv_o64_i576_k58_int16_nb@t_l49" and conv.symbol("offset").endswith("k64_int16_nb")
    cuda = KernelSpec(768, 3072, 307, "int16", True, "float16")
    assert cuda.key("cuda-sm_90") == "o768_i3072_k307_int16_b_float16@cuda-sm_90"
    assert cuda.measured_record_name() == "o768_i3072_k312_float16"
    assert KernelSpec.hashed_symbol("col", cuda.key("cuda-sm_90")).startswith("srigl_cuda_col_")


@pytest.fixture(scope="module")
def masked():
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)), SRigLConfig(sparsity=0.8))


@pytest.mark.tvm
def test_a_config_lowers_as_the_options_do(masked):
    pytest.importorskip("tvm")
    by_name = lower(masked, target="llvm", col_threshold=16, progress=False)
    by_config = lower(masked, LlvmConfig(col_threshold=16, progress=False))
    x = torch.randn(5, 32)
    assert [by_config[i].kernel_key for i in (0, 2)] == [by_name[i].kernel_key for i in (0, 2)]
    assert by_config[0].col_threshold == by_config[2].col_threshold == 16
    with torch.no_grad():
        assert torch.equal(by_config(x), by_name(x))


@pytest.mark.tvm
def test_a_config_and_keyword_options_together_are_refused(masked):
    with pytest.raises(LoweringError, match=r"\['tune'\]: set them in the config"):
        lower(masked, LlvmConfig(), tune=True)
    with pytest.raises(LoweringError, match="float16"):
        lower(masked, LlvmConfig(dtype=torch.float16))
    with pytest.raises(UnsupportedTargetError, match="arch"):
        lower(masked, CudaConfig({"kind": "cuda"}))
