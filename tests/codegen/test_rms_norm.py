"""A lowered model's RMS norms (torch's nn.RMSNorm, Llama-family and Gemma RMSNorm modules, recognised by what
they compute) run by the RMS-norm kernel of its linear libraries: the module's output to float32 rounding, its
weight shared under the same name, saved and loaded; modules that only look like one are left alone."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, cpu_graph, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.norms import LoweredRMSNorm, rms_norm_form

pytestmark = pytest.mark.tvm


class _LlamaStyle(nn.Module):
    """Hugging Face's LlamaRMSNorm, as written there."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _GemmaStyle(_LlamaStyle):
    """Gemma's: scaled by 1 + weight (a weight initialised at zero)."""

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class _MeanCentred(_LlamaStyle):
    """A layer norm without bias: one weight and an eps, but not an RMS norm."""

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.variance_epsilon)


class _Gated(_LlamaStyle):
    """Mamba-2's gated norm: called with a gate by its mixer, a plain RMS norm without one."""

    def forward(self, x, gate=None):
        if gate is not None:
            x = x * torch.nn.functional.silu(gate)
        return super().forward(x)


class _ScaledInside(_LlamaStyle):
    """rms(x * (1 + w)): equal to (1 + w) * rms(x) only while w = 0 (its initial weight)."""

    def forward(self, x):
        x = x * (1 + self.weight)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class _EpsOutside(_LlamaStyle):
    """x / (rms(x) + eps): another eps placement, equal to the RMS norm at unit scale within 1e-6."""

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)


def test_norms_that_only_look_like_rms_norms_are_left_alone():
    """A probe found a gated norm accepted (its lowered form then refused the mixer's gate argument), a norm
    scaling inside the square root accepted at its zero weight (1.43 off once loaded), and eps read from an
    attribute but never measured (0.9 off at small inputs). Hooks of the module do not fire while probing."""
    scaled = _ScaledInside(24)
    nn.init.zeros_(scaled.weight)
    fired = []
    hooked = _LlamaStyle(24)
    hooked.register_forward_hook(lambda *args: fired.append(1))
    assert rms_norm_form(hooked) == (1e-6, 0.0) and not fired
    for other in (_Gated(24), scaled, _EpsOutside(24, eps=1e-3)):
        assert rms_norm_form(other) is None, other


def test_rms_norms_are_recognised_by_what_they_compute():
    assert rms_norm_form(nn.RMSNorm(24, eps=1e-5)) == (1e-5, 0.0)
    assert rms_norm_form(nn.RMSNorm(24))[1] == 0.0  # (eps None: float32's machine epsilon)
    assert rms_norm_form(_LlamaStyle(24)) == (1e-6, 0.0)
    gemma = _GemmaStyle(24)
    nn.init.zeros_(gemma.weight)
    assert rms_norm_form(gemma) == (1e-6, 1.0)
    for other in (_MeanCentred(24), nn.LayerNorm(24, bias=False), nn.LayerNorm(24), nn.Linear(24, 24),
                  nn.RMSNorm(24, elementwise_affine=False), nn.RMSNorm((4, 6))):
        assert rms_norm_form(other) is None, other


@pytest.mark.parametrize("width", [17, 64, 200])  # a scalar tail, whole vectors, both
@pytest.mark.parametrize("kind", ["torch", "llama", "gemma"])
def test_the_kernel_equals_the_module_and_replays(width, kind):
    torch.manual_seed(0)
    norm = {"torch": lambda: nn.RMSNorm(width, eps=1e-5), "llama": lambda: _LlamaStyle(width),
            "gemma": lambda: _GemmaStyle(width)}[kind]()
    with torch.no_grad():
        norm.weight.normal_()
    masked = sparsify(nn.Sequential(nn.Linear(width, width), norm, nn.Linear(width, 8)),
                      SRigLConfig(sparsity=0.5)).eval()
    lowered = lower(masked, progress=False)
    assert type(lowered[1]) is LoweredRMSNorm and lowered[1].weight is not None
    assert set(lowered[1].state_dict()) == set(masked[1].state_dict()) == {"weight"}
    graphed = cpu_graph(lowered)
    with torch.no_grad():
        for shape in ((1, width), (37, width), (2, 5, width)):
            x = torch.randn(shape)
            want = masked(x)
            torch.testing.assert_close(lowered(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graphed(x), want, rtol=1e-5, atol=1e-5)


def test_a_lowered_rms_norm_saves_loads_and_follows_its_weight(tmp_path):
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(32, 32), _LlamaStyle(32)), SRigLConfig(sparsity=0.5)).eval()
    lowered = lower(masked, progress=False)
    save_lowered(lowered, tmp_path / "model")
    loaded = load_lowered(tmp_path / "model")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), lowered(x), rtol=0, atol=0)
        loaded[1].weight.mul_(2.0)
        torch.testing.assert_close(loaded(x), 2 * lowered(x), rtol=1e-6, atol=1e-6)
    assert type(loaded[1]) is LoweredRMSNorm
