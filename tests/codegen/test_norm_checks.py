"""Lowered norms against float64 references: LayerNorm subclasses with their own forward left alone, torch's
RMSNorm with eps None (float32's machine epsilon) and eps 0, and modules that compute an RMS norm only at the
state they were probed in (a buffer, a second parameter) or only roughly (a mean over n - 1) not taken for one.
Each test failed on a mutant the rest of the suite let through (mutation probe, session 44)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.norms import LoweredRMSNorm, can_lower_layer_norm, rms_norm_form

pytestmark = pytest.mark.tvm

WIDTH = 24
FLOAT32_EPS = torch.finfo(torch.float32).eps


class _DoubledLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass whose forward is not nn.LayerNorm's."""

    def forward(self, x):
        return 2 * super().forward(x) + 1


class _RMS(nn.Module):
    """Llama's RMS norm, the base of the look-alikes below."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class _BufferScaled(_RMS):
    """An RMS norm times a buffer that is 1 when probed (a state dict may load another)."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x):
        return self.scale * super().forward(x)


class _Shifted(_RMS):
    """An RMS norm plus a second parameter, zero when probed."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.shift = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return super().forward(x) + self.shift


class _MeanOverNMinusOne(_RMS):
    """sqrt(sum(x^2) / (n - 1)): 0.25% off the RMS norm at n = 200, far more than float32 rounding."""

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)
                                             + self.variance_epsilon)


def _rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.fixture(scope="module")
def lowered_norms():
    """One lowered model holding every norm below, each after a Linear; (masked, lowered)."""
    torch.manual_seed(3)
    norms = [_DoubledLayerNorm(WIDTH), nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH, eps=0.0), _BufferScaled(WIDTH),
             _Shifted(WIDTH)]
    layers = [nn.Linear(WIDTH, WIDTH)]
    for norm in norms:
        layers += [norm, nn.Linear(WIDTH, WIDTH)]
    masked = sparsify(nn.Sequential(*layers), SRigLConfig(sparsity=0.5)).eval()
    return masked, lower(masked, example_inputs=torch.randn(2, WIDTH), progress=False)


def test_a_layer_norm_subclass_with_its_own_forward_is_left_alone(lowered_norms):
    _, lowered = lowered_norms
    assert not can_lower_layer_norm(_DoubledLayerNorm(WIDTH))
    assert type(lowered[1]) is _DoubledLayerNorm
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        h = lowered[0](x)
        torch.testing.assert_close(lowered[1](h), 2 * F.layer_norm(h, (WIDTH,), eps=1e-5) + 1, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("index, eps", [(3, FLOAT32_EPS), (5, 0.0)])  # nn.RMSNorm(eps=None), nn.RMSNorm(eps=0)
def test_torch_s_rms_norm_with_eps_none_or_zero_is_lowered_with_that_eps(lowered_norms, index, eps):
    """eps None is float32's machine epsilon in torch (1.19e-7): at inputs of scale 1e-4 it outweighs the mean
    square; eps 0 is a valid RMS norm."""
    masked, lowered = lowered_norms
    assert rms_norm_form(masked[index]) == (eps, 0.0)
    norm = lowered[index]
    assert type(norm) is LoweredRMSNorm and norm.eps == eps
    with torch.no_grad():
        norm.weight.normal_()
        masked[index].weight.copy_(norm.weight)  # (the masked model's norm is another copy)
        for scale in (1e-4, 1.0):
            x = scale * torch.randn(4, WIDTH)
            torch.testing.assert_close(norm(x).double(), _rms64(x, norm.weight, eps), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(norm(x), F.rms_norm(x, (WIDTH,), norm.weight, eps=masked[index].eps),
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("index, state", [(7, "scale"), (9, "shift")])
def test_a_norm_with_more_state_than_a_weight_is_left_alone(lowered_norms, index, state):
    """A buffer or a second parameter that is neutral when probed changes the output once it is loaded."""
    masked, lowered = lowered_norms
    assert rms_norm_form(masked[index]) is None
    assert type(lowered[index]) is type(masked[index])
    with torch.no_grad():
        for model in (masked, lowered):
            getattr(model[index], state).fill_(0.5)
        h = torch.randn(3, WIDTH)
        torch.testing.assert_close(lowered[index](h), masked[index](h), rtol=1e-5, atol=1e-5)
        x = torch.randn(3, WIDTH)
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-5)


def test_a_norm_only_near_an_rms_norm_is_not_taken_for_one():
    """sqrt(sum / (n - 1)) differs from the RMS by sqrt(n / (n - 1)): within 1e-2, not within float32 rounding."""
    norm = _MeanOverNMinusOne(200)
    x = torch.randn(4, 200)
    with torch.no_grad():
        gap = (norm(x) / _rms64(x, norm.weight, norm.variance_epsilon).float() - 1).abs().max()
    assert 1e-3 < gap < 1e-2
    assert rms_norm_form(norm) is None
    assert rms_norm_form(_RMS(200)) == (1e-6, 0.0)
