"""The model benchmark's per-layer efficiency table (benchmarks/layer_efficiency.py) counts a forward's work and
time whether the forward calls a layer once or once per batch chunk (``nn.batch_chunks``), and a stem convolution
run with its max-pool (``nn.conv_pool``) as one row with the convolution's work."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from layer_efficiency import layer_efficiency

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.settle import settle
from srigl_compile.zoo import ResNet

pytestmark = pytest.mark.tvm


def test_chunked_layers_count_every_call_of_a_forward():
    torch.manual_seed(0)
    model = ResNet(num_classes=10, blocks=(1, 1), width=8).eval()
    x = torch.randn(6, 3, 32, 32)
    lowered = lower(sparsify(model, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,)),
                    progress=False)
    settle(lowered, x)  # (as the benchmarks do: the dense-form trials end before the timed forwards)
    lowered.layers.chunk_sizes[lowered.layers._seen] = x.shape[0]  # whole batches, whatever settle measured
    whole = layer_efficiency(lowered, x, forwards=2)
    lowered.layers.chunk_sizes[lowered.layers._seen] = 2  # three chunks of two images
    chunked = layer_efficiency(lowered, x, forwards=2)
    in_stack = {name for name, _ in lowered.layers.named_modules(prefix="layers")}
    calls = {row["layer"]: row["calls"] for row in chunked["layers"]}
    assert {calls[name] for name in calls if name in in_stack} == {3} and calls["maxpool"] == 1
    stem = next(row for row in whole["layers"] if row["layer"] == "maxpool")  # (the stem conv, with its pool)
    conv = lowered.maxpool.conv
    assert stem["kind"] == "LoweredConvMaxPool" and (stem["n_active"], stem["k"]) == (conv.n_active, conv.k)
    work = 2 * conv.n_active * conv.k * 6 * 16 * 16  # its positions: 6 images of 16 x 16 (7x7/2 on 32 x 32)
    assert stem["gflops"] * stem["ms"] * 1e6 == pytest.approx(work, rel=1e-9)
    assert {row["calls"] for row in whole["layers"]} == {1}
    assert chunked["useful_gflop"] == pytest.approx(whole["useful_gflop"], rel=1e-12)
    for table in (whole, chunked):
        assert all(row["ms"] > 0 for row in table["layers"])
        assert table["gflops"] == pytest.approx(table["useful_gflop"] / table["layers_ms"] * 1e3)
