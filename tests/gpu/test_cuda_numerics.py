"""lower(target="cuda") on a GPU: lowered == masked model for Linear and Conv layers and whole models, at batches
that reach every regime (decode, col, expand + cuBLAS), in float32 and float16 (the kernels sum in float32); each
regime forced on the paper's layer; capture and replay in CUDA graphs. Marked gpu: skipped without CUDA.
The float32 reference runs with TF32 off (cuDNN's default is on: ~4e-4 off, more than the tolerance).

On the GPU machine: bash .gpu_bundle/run.sh python -m pytest -q tests/gpu
"""

import sys
from pathlib import Path

import pytest
import torch

from srigl_compile import lower
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from tests.gpu.cases import BATCHES, DTYPES, TARGET, cases

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import no_tf32  # noqa: E402  (the fp32 reference in full float32)

pytestmark = pytest.mark.gpu

CASES = cases()  # built without a GPU too, so the skipped tests are listed by name


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(scope="module")
def lowered_models():
    return {(name, dtype): lower(masked, target=TARGET, dtype=dtype) for name, (masked, _) in CASES.items()
            for dtype in DTYPES}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_lowered_equals_masked(lowered_models, name, dtype, batch):
    masked, shape = CASES[name]
    lowered = lowered_models[name, dtype]
    assert any(isinstance(m, (LoweredLinear, LoweredConv)) for m in lowered.modules())
    assert next(lowered.buffers()).is_cuda, "lower(target='cuda') moves the model to the GPU"
    x = torch.randn(batch, *shape, device="cuda")
    with torch.no_grad(), no_tf32():
        expected = masked.to("cuda")(x)
        got = lowered(x.to(dtype))
    assert got.dtype == dtype and got.shape == expected.shape
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.float() / scale, expected / scale, **TOLERANCE[dtype])


def test_wrong_device_and_dtype_are_clear_errors(lowered_models):
    from srigl_compile import DeviceError

    lowered = lowered_models["linear_3072_768", torch.float32]
    with pytest.raises(DeviceError, match="cuda"):
        lowered(torch.randn(2, 3072))
    with pytest.raises(DeviceError, match="float32"):
        lowered(torch.randn(2, 3072, device="cuda", dtype=torch.float16))


def test_runs_on_a_side_stream_and_under_torch_compile(lowered_models):
    lowered = lowered_models["mlp_ablated", torch.float32]
    x = torch.randn(37, 32, device="cuda")
    expected = lowered(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        got = lowered(x)
    stream.synchronize()
    torch.testing.assert_close(got, expected)
    compiled = torch.compile(lowered, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected)


def _layer_and_handle(lowered_models, name, dtype):
    from srigl_compile.runtime.registry import get_handle

    lowered = lowered_models[name, dtype]
    return lowered, get_handle(lowered[0].kernel_key)


@pytest.mark.parametrize("regime", ["decode", "col", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["linear_3072_768", "linear_3072_10"])
def test_every_regime_matches_at_every_batch(lowered_models, name, regime, dtype, monkeypatch):
    """Each kernel on its own (the dispatch forced), at batches inside and across its tiles; on the paper's layer,
    and on 10 rows, where the expand kernel's last block of rows reaches past n_out (run under compute-sanitizer by
    scripts/gpu_check.sh: an out-of-range read there changes no output)."""
    from srigl_compile.runtime.cuda_params import CudaDispatch

    masked, _ = CASES[name]
    lowered, handle = _layer_and_handle(lowered_models, name, dtype)
    tiles = handle.dispatch.tiles
    forced = {"decode": CudaDispatch(tiles, 10 ** 9, 0), "col": CudaDispatch(tiles, 1, 0),
              "dense": CudaDispatch(tiles, 1, 1)}[regime]
    monkeypatch.setattr(handle, "dispatch", forced)
    for batch in (1, 2, 5, 16, 33, 100):
        assert handle.regime(batch) == regime
        x = torch.randn(batch, 3072, device="cuda")
        with torch.no_grad(), no_tf32():
            expected = masked.to("cuda")(x)
            got = lowered(x.to(dtype))
        scale = expected.abs().max().clamp(min=1.0)
        torch.testing.assert_close(got.float() / scale, expected / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("batch", [1, 9, 256])
def test_lowered_model_captures_and_replays_in_a_cuda_graph(lowered_models, batch):
    lowered = lowered_models["mlp_ablated", torch.float16]
    static_x = torch.randn(batch, 32, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up: loads the kernels outside the capture
            lowered(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = lowered(static_x)
    for _ in range(3):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_y, lowered(x))


def test_reduce_overhead_compile_replays_graphs(lowered_models):
    lowered = lowered_models["mlp_ablated", torch.float16]
    compiled = torch.compile(lowered, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(9, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = lowered(x)
        for _ in range(3):
            got = compiled(x)
    torch.testing.assert_close(got, expected)
