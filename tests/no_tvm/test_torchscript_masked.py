"""torch.jit.script on a sparsified model: Linear and convolution layers compile (their forward is the torch
layer's own; the mask lives in the weight's zeros), and attention with packed sparse projections is refused with a
typed error naming the fixes. Before, every masked model failed inside TorchScript with "Unknown type annotation:
'nn.Parameter'"."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify, unsparsify
from srigl_compile.errors import TraceError


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _conv1d():
    return nn.Sequential(nn.Conv1d(4, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 12, 3))


@pytest.mark.parametrize("make, shape", [(_cnn, (2, 3, 8, 8)), (_conv1d, (2, 4, 16))], ids=["cnn", "conv1d"])
def test_masked_models_script_and_compute_what_they_compute_in_eager(make, shape):
    torch.manual_seed(0)
    model = sparsify(make(), SRigLConfig(sparsity=0.8, seed=1)).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(*shape)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    assert any(name.endswith("mask") for name, _ in scripted.named_buffers())  # (the masks travel with it)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)

    def forward(self, x):
        return self.layer(x)


def test_packed_attention_is_refused_with_the_fixes_and_unsparsify_scripts():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = sparsify(_Encoder().eval(), SRigLConfig(sparsity=0.8, seed=1), example_inputs=x)
    with pytest.raises(TraceError, match=r"torch.jit.script cannot compile MaskedMultiheadAttention: .* use "
                                         r"torch.jit.trace or torch.export, or script srigl_compile.unsparsify"):
        torch.jit.script(model)
    scripted = torch.jit.script(unsparsify(model).eval())
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)
