"""LowerMaxPoolPass and LowerGlobalAvgPoolPass: a lowered model's nn.MaxPool2d and nn.AdaptiveAvgPool2d(1) layers
run the pooling kernels of its convolution libraries."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.conv_pool import LoweredConvMaxPool
from srigl_compile.nn.pooling import LoweredGlobalAvgPool2d, LoweredMaxPool2d
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


class PoolingCNN(nn.Module):
    """Pools the kernels compute (stem 3x3/2, dilated, unbatched-friendly; a global average pool) and three they do
    not (ceil mode, indices, an average pool to 2 x 2)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.dilated = nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1))
        self.ceil = nn.MaxPool2d(2, ceil_mode=True)
        self.indices = nn.MaxPool2d(2, return_indices=True)
        self.head = nn.Conv2d(8, 20, 1)
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.regional_pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        h = self.ceil(self.dilated(self.stem(x)))
        h, _ = self.indices(h)
        h = self.head(h)
        return torch.cat([self.global_pool(h).flatten(1), self.regional_pool(h).flatten(1)], 1)


@pytest.fixture(scope="module")
def pooling_cnn():
    torch.manual_seed(0)
    masked = sparsify(PoolingCNN(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    return masked, lower(masked, progress=False)


def test_pools_the_kernel_computes_are_lowered_and_equal_torch(pooling_cnn):
    masked, lowered = pooling_cnn
    # the stem's pool alone reads its conv: both run in its place, band by band (``test_conv_pool.py``)
    assert isinstance(lowered.stem[2], LoweredConvMaxPool) and isinstance(lowered.stem[0], nn.Identity)
    assert isinstance(lowered.stem[2].pool, LoweredMaxPool2d) and isinstance(lowered.dilated, LoweredMaxPool2d)
    assert type(lowered.ceil) is nn.MaxPool2d and type(lowered.indices) is nn.MaxPool2d  # left as they were
    assert isinstance(lowered.global_pool, LoweredGlobalAvgPool2d)
    assert type(lowered.regional_pool) is nn.AdaptiveAvgPool2d  # (to 2 x 2: left as it was)
    for pool, function in ((lowered.dilated, "max_pool_fn"), (lowered.global_pool, "global_avg_pool_fn")):
        assert getattr(get_handle(pool.kernel_key), function, None) is not None
    with torch.no_grad():
        for shape in ((1, 3, 17, 19), (3, 3, 12, 12)):
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(8, 9, 10)  # unbatched, as nn.MaxPool2d takes it
        assert torch.equal(lowered.stem[2].pool(x), nn.functional.max_pool2d(x, 3, 2, 1))
        torch.testing.assert_close(lowered.global_pool(x), nn.functional.adaptive_avg_pool2d(x, 1), rtol=1e-6,
                                   atol=1e-6)
        planar = torch.randn(2, 20, 32).as_strided((2, 20, 5, 5), (640, 32, 5, 1))  # channels 32 floats apart
        torch.testing.assert_close(lowered.global_pool(planar), nn.functional.adaptive_avg_pool2d(planar, 1),
                                   rtol=1e-6, atol=1e-6)


def test_a_library_without_the_pool_and_autograd_inputs_run_torch(pooling_cnn, monkeypatch):
    _, lowered = pooling_cnn
    pool = lowered.stem[2].pool
    x = torch.randn(2, 8, 9, 9)
    expected = nn.functional.max_pool2d(x, 3, 2, 1)
    monkeypatch.setattr(get_handle(pool.kernel_key), "max_pool_fn", None)  # a library saved before it existed
    assert torch.equal(pool(x), expected)
    monkeypatch.undo()
    tracked = x.clone().requires_grad_()
    pool(tracked).sum().backward()  # torch's pool, so gradients flow
    assert tracked.grad is not None and torch.equal(pool(x), expected)


def test_the_global_pool_without_its_kernel_or_on_other_inputs_runs_torch(pooling_cnn, monkeypatch):
    _, lowered = pooling_cnn
    pool = lowered.global_pool
    x = torch.randn(2, 8, 5, 6)
    monkeypatch.setattr(get_handle(pool.kernel_key), "global_avg_pool_fn", None)  # a library saved before it
    assert torch.equal(pool(x), nn.functional.adaptive_avg_pool2d(x, 1))
    monkeypatch.undo()
    tracked = x.clone().requires_grad_()
    pool(tracked).sum().backward()  # torch's pool, so gradients flow
    assert tracked.grad is not None and torch.equal(tracked.grad, torch.full_like(x, 1 / 30))
    double = x.double()
    assert torch.equal(pool(double), nn.functional.adaptive_avg_pool2d(double, 1))
    assert pool(torch.empty(0, 8, 5, 6)).shape == (0, 8, 1, 1)


def test_lowered_pools_under_fx_export_and_compile(pooling_cnn):
    masked, lowered = pooling_cnn
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = masked(x)
        program = torch.export.export(lowered, (x,))
        targets = [str(node.target) for node in program.graph.nodes]
        assert any("tvm_max_pool2d" in t for t in targets) and any("tvm_global_avg_pool2d" in t for t in targets)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(lowered, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_lowered_pools_save_and_load_in_a_fresh_process(pooling_cnn, tmp_path):
    masked, lowered = pooling_cnn
    save_lowered(lowered, tmp_path / "model")
    x = torch.randn(2, 3, 15, 15)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(masked(x), tmp_path / "expected.pt")
    code = (f"import torch; from srigl_compile import load_lowered; m = load_lowered({str(tmp_path / 'model')!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); e = torch.load({str(tmp_path / 'expected.pt')!r}); "
            "assert type(m.stem[2].pool).__name__ == 'LoweredMaxPool2d'; "
            "assert type(m.global_pool).__name__ == 'LoweredGlobalAvgPool2d'; "
            "torch.testing.assert_close(m(x), e, rtol=1e-5, atol=1e-5)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.equal(load_lowered(tmp_path / "model")(x), lowered(x))


def test_a_model_without_a_direct_convolution_keeps_its_pools():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 6))
    lowered = lower(sparsify(model, SRigLConfig(sparsity=0.5)), progress=False)
    assert type(lowered[0]) is nn.MaxPool2d and type(lowered[1]) is nn.AdaptiveAvgPool2d  # no library to run them
