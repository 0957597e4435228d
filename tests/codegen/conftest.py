"""Fixtures the codegen tests share."""

import pytest
import torch

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn import dense_fallback
from tests.helpers import ablate
from tests.models import condense_mlp


@pytest.fixture(scope="module")
def lowered_mlp():
    torch.manual_seed(0)
    masked = ablate(sparsify(condense_mlp(), SRigLConfig(sparsity=0.8, seed=1)), {"0": [1, 5], "3": [2]},
                    {("0", 5): 0.4})
    return masked, lower(masked, progress=False)


@pytest.fixture
def short_trials(monkeypatch):
    """Dense-form trials (``nn.dense_fallback``) of two calls a shape: one untimed, one timed."""
    monkeypatch.setattr(dense_fallback, "ROUNDS", 1)
    monkeypatch.setattr(dense_fallback, "BUDGET_S", 0.0)
