"""The models and helpers the dense-form tests share (``test_dense_fallback.py``, ``test_traced_dense.py``)."""

import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn import dense_fallback
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear

from ..helpers import ablate


class Block(nn.Module):
    """conv -> relu, conv (strided) + shortcut -> relu, linear: epilogues and a residual the kernels fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # (ablated: compact, its zeros dropped)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.shortcut = nn.Conv2d(16, 16, 1, stride=2)
        self.fc = nn.Linear(16 * 5 * 5, 24)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + self.shortcut(x))
        return self.fc(y.flatten(1))


class Net(nn.Module):
    """The block as a child: lower fuses epilogues in traced child modules, not in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


def sparse_model(sparsity: float, ablated: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = sparsify(Net().eval(), SRigLConfig(sparsity=sparsity, distribution="uniform"),
                     example_inputs=(torch.randn(2, 16, 10, 10),))
    if ablated:
        # more than a quarter of each: not padded back as zero rows (conv1 becomes compact, fc scatters)
        ablate(model, {"block.conv1": [1, 3, 7, 9, 12], "block.fc": [0, 2, 5, 8, 11, 17, 20]})
    return model


def forms_of(model: nn.Module) -> dict:
    return {name: m.__dict__.get("_dense_form") for name, m in model.named_modules()
            if isinstance(m, (LoweredConv, LoweredLinear))}


def force(monkeypatch, path: str) -> None:
    """Trials choose ``path`` ("dense" or "kernel") whatever the timings (this test's layers are tiny)."""
    dense = path == "dense"
    monkeypatch.setattr(dense_fallback, "MARGIN", float("inf") if dense else 0.0)
    monkeypatch.setattr(dense_fallback, "MIN_SAVING_S", float("-inf") if dense else float("inf"))


def chosen_dense(monkeypatch) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(masked model, lowered model, input) with every layer's dense form chosen at the input's shape (trials of
    two calls: the ``short_trials`` fixture)."""
    model = sparse_model(0.5)
    lowered = lower(model, progress=False)
    force(monkeypatch, "dense")
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        for _ in range(2):
            lowered(x)
    return model, lowered, x
