"""lower(target="cuda") on a GPU: lowered == masked model for Linear and Conv layers and whole models, at batch
1, 37, 256 and 2048, in float32 and float16 (the kernels sum in float32). Marked gpu: skipped without CUDA.

On the GPU machine: bash .gpu_bundle/run.sh python -m pytest -q tests/gpu
"""

import pytest
import torch

from srigl_compile import lower
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from tests.gpu.cases import BATCHES, DTYPES, TARGET, cases

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
    with torch.no_grad():
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
