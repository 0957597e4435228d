"""lower() is one pass pipeline: one graph capture serves its passes up to the epilogue fusion, which rewrites
module forwards (the planar layout captures the fused graph once more), and one fake forward serves them all."""

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.cpu_target import host_llvm_target
from srigl_compile.passes import graph_capture
from srigl_compile.runtime.cpu_features import cpu_features
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_lower_captures_the_graph_once_and_runs_one_fake_forward(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 49, 10))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    traces = _counting(monkeypatch, graph_capture, "_trace")
    fake_calls = []  # (the hook travels with lower's deep copy; layers are replaced)
    masked.register_forward_pre_hook(lambda m, args: fake_calls.append(isinstance(args[0], FakeTensor)))
    x = torch.randn(2, 3, 7, 7)
    lowered = lower(masked, example_inputs=(x,), progress=False)
    assert len(traces) == 2, "condense (shrink), the BatchNorm fold and the fusion share one; the planar layout"
    assert fake_calls == [True], "one fake forward for the output sizes, and no other forward"
    assert isinstance(lowered[1], nn.Identity) and isinstance(lowered[4], nn.Identity)
    wide = "avx512f" in cpu_features(host_llvm_target())  # (AVX-512: one tile of whole vectors over planar images)
    assert get_handle(lowered[3].kernel_key).lanes == (64 if wide else 49), "the 7x7 grid from the shape analysis"
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
