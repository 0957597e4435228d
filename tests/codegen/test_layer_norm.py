"""A lowered model's nn.LayerNorm layers run by the layer-norm kernel of its linear libraries: values as torch's
to float32 rounding (two-pass mean and variance), parameters shared, saved, exported; inputs the kernel does not
take fall back to torch."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.norms import LoweredLayerNorm
from srigl_compile.runtime import norm_op

pytestmark = pytest.mark.tvm


def _lowered(*norms: nn.Module, width: int = 24):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(width, width), *norms)
    masked = sparsify(model, SRigLConfig(sparsity=0.5)).eval()
    return masked, lower(masked, example_inputs=torch.randn(2, width), progress=False)


@pytest.mark.parametrize("width", [17, 24, 768])  # a scalar tail, one vector short of two, whole vectors
@pytest.mark.parametrize("norm", [dict(), dict(elementwise_affine=False), dict(bias=False)])
def test_the_kernel_equals_torch_s_layer_norm(width, norm):
    masked, lowered = _lowered(nn.LayerNorm(width, eps=1e-6, **norm), width=width)
    assert type(lowered[1]) is LoweredLayerNorm and lowered[1].kernel_key == lowered[0].kernel_key
    if norm.get("elementwise_affine", True):
        with torch.no_grad():
            lowered[1].weight.copy_(torch.randn(width))  # (shared: the masked model's norm is another copy)
            masked[1].weight.copy_(lowered[1].weight)
            if lowered[1].bias is not None:
                lowered[1].bias.copy_(torch.randn(width))
                masked[1].bias.copy_(lowered[1].bias)
    with torch.no_grad():
        for shape in ((1, width), (197, width), (3, 5, width)):
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)


def test_two_passes_keep_a_large_mean_exact():
    """Rows with mean 1e3 and spread 1e-1: summing squares minus the squared mean would lose every digit."""
    norm = nn.LayerNorm(64)
    _, lowered = _lowered(norm, width=64)
    x = 1e3 + 0.1 * torch.randn(8, 64, dtype=torch.float64)
    want = F.layer_norm(x, (64,), eps=1e-5)
    with torch.no_grad():
        got = lowered[1](x.float()).double()
    assert (got - want).abs().max() < 2e-3  # float32 rounding of x itself: 1e3 * 6e-8 / 0.1 ~ 6e-4


def test_lowered_norms_share_parameters_save_and_export(tmp_path):
    masked, lowered = _lowered(nn.LayerNorm(24), nn.Linear(24, 8), nn.LayerNorm(8))
    assert [type(lowered[i]) for i in (1, 3)] == [LoweredLayerNorm] * 2
    for i, width in ((1, 24), (3, 8)):
        assert set(lowered[i].state_dict()) == set(nn.LayerNorm(width).state_dict())
        torch.testing.assert_close(lowered[i].weight, masked[i].weight, rtol=0, atol=0)
    x = torch.randn(4, 24)
    with torch.no_grad():
        want = masked(x)
        torch.testing.assert_close(lowered(x), want, rtol=1e-5, atol=1e-5)
        save_lowered(lowered, tmp_path / "model")
        torch.testing.assert_close(load_lowered(tmp_path / "model")(x), want, rtol=1e-5, atol=1e-5)
        program = torch.export.export(lowered, (x,), strict=False)
        assert any("tvm_layer_norm" in str(node.target) for node in program.graph.nodes)
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)


def test_inputs_the_kernel_does_not_take_run_torch_s_layer_norm():
    _, lowered = _lowered(nn.LayerNorm(24))
    norm = lowered[1]
    calls = []
    handle_fn = norm_op.get_handle(norm.kernel_key).layer_norm_fn

    def counted(*args):
        calls.append(1)
        return handle_fn(*args)

    object.__setattr__(norm_op.get_handle(norm.kernel_key), "layer_norm_fn", counted)
    try:
        x = torch.randn(3, 24)
        norm(x)
        assert calls == [1], "a float32 CPU input runs the kernel"
        tracked = torch.randn(3, 24, requires_grad=True)
        torch.testing.assert_close(norm(tracked), F.layer_norm(tracked, (24,), norm.weight, norm.bias, norm.eps))
        with pytest.raises(RuntimeError, match="mixed dtype"):
            norm(x.double())  # torch's own error, as nn.LayerNorm gives it
        assert calls == [1], "float64 and autograd inputs run torch's"
        with pytest.raises(RuntimeError, match="normalized_shape"):
            norm(torch.randn(3, 25))  # torch's own error for a wrong width
    finally:
        object.__setattr__(norm_op.get_handle(norm.kernel_key), "layer_norm_fn", handle_fn)
