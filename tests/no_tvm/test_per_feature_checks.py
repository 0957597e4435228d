"""Ops that mix features stop the walk that cuts ablated neurons (``passes.per_feature``), whichever way the
model writes them: a tensor method, a torch.nn.functional call, or an aten op in a torch.export graph. Each test
failed on a mutant the rest of the suite let through (mutation probe, session 44)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, condense, sparsify
from srigl_compile.passes.graph_capture import capture_graph
from tests.helpers import ablate, assert_same


class _SoftmaxBetween(nn.Module):
    """Linear -> softmax over the features (written as ``how``) -> Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.a(x)
        if self.how == "method":
            h = h.softmax(-1)
        elif self.how == "function":
            h = F.softmax(h, dim=-1)
        else:  # (a branch on a shape: symbolic_trace fails, torch.export captures aten ops)
            if x.shape[0] > 0:
                h = h + 0.0
            h = torch.softmax(h, -1)
        return self.b(h)


@pytest.mark.parametrize("how, capture", [("method", "symbolic_trace"), ("function", "symbolic_trace"),
                                          ("export", "export")])
def test_a_softmax_written_any_way_keeps_the_ablated_neurons_before_it(how, capture):
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    example = dict(example_inputs=(x,)) if capture == "export" else {}
    masked = sparsify(_SoftmaxBetween(how), SRigLConfig(sparsity=0.8, distribution="uniform", seed=1),
                      **example).eval()
    assert capture_graph(masked, x).method == capture
    ablate(masked, {"a": [1, 5, 7]}, {("a", 5): -0.5, ("a", 7): 0.7})
    condensed = condense(masked, **example)
    assert not condensed.a.compact and condensed.a.out_features == condensed.b.fan_in == 64
    assert_same(condensed, masked, x)
