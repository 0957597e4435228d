"""The pass manager and its analyses: computed once, kept by the passes that preserve them, dropped otherwise."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.errors import TraceError
from srigl_compile.passes import graph_capture
from srigl_compile.passes.analysis import GRAPH, OUTPUT_SHAPES, Analyses
from srigl_compile.passes.base import Pass, PassResult
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fold_batchnorm import fold_batchnorm
from srigl_compile.passes.manager import PassManager


class _Touch(Pass):
    """Modifies the model (a buffer) and preserves what it is told to."""

    def __init__(self, preserves=frozenset(), new_module=False):
        self.preserves = frozenset(preserves)
        self.new_module = new_module

    def call(self, model, analyses):
        if self.new_module:
            return PassResult(nn.Sequential(model), modified=True)
        model.register_buffer("touched", torch.zeros(1))
        return PassResult(model, modified=True)


class _Read(Pass):
    """Reads the graph and records the object it got."""

    def __init__(self, seen):
        self.seen = seen

    def call(self, model, analyses):
        self.seen.append(analyses.get(GRAPH, model))
        return PassResult(model, modified=False)


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("touch, same", [(_Touch({GRAPH}), True), (_Touch({OUTPUT_SHAPES}), False),
                                         (_Touch({GRAPH}, new_module=True), False)])
def test_an_analysis_survives_exactly_the_passes_that_preserve_it(touch, same):
    seen = []
    PassManager([_Read(seen), touch, _Read(seen)]).run(_net())
    assert len(seen) == 2 and (seen[0] is seen[1]) == same


def test_a_pass_that_changes_nothing_keeps_every_analysis():
    seen = []
    net = _net()
    PassManager([_Read(seen), _Read(seen)]).run(net)
    assert seen[0] is seen[1]


def test_a_failed_analysis_is_raised_again_without_a_second_attempt(monkeypatch):
    calls = []

    def failing(model, example_inputs=None):
        calls.append(1)
        raise TraceError("untraceable")

    analyses = Analyses()
    monkeypatch.setattr(graph_capture, "_trace", failing)
    net = _net()
    for _ in range(2):
        with pytest.raises(TraceError):
            analyses.get(GRAPH, net)
    assert len(calls) == 1


def test_output_shapes_come_from_a_fake_forward_and_leave_the_outputs_alone():
    net = _net()
    x = torch.randn(2, 3, 10, 10)
    before = net(x)
    shapes = Analyses((x,)).get(OUTPUT_SHAPES, net)
    assert shapes["0"] == (2, 8, 8, 8) and shapes["3"] == (2, 4, 8, 8) and shapes[""] == (2, 4, 8, 8)
    assert Analyses().get(OUTPUT_SHAPES, net) == {}, "no example inputs: no sizes"
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def _count_captures(monkeypatch):
    calls = []
    trace = graph_capture._trace

    def counting(model):
        calls.append(type(model).__name__)
        return trace(model)

    monkeypatch.setattr(graph_capture, "_trace", counting)
    return calls


def test_condense_and_its_shrink_share_one_graph_capture(monkeypatch):
    torch.manual_seed(0)
    masked = sparsify(_net(), SRigLConfig(sparsity=0.7, distribution="uniform"))
    calls = _count_captures(monkeypatch)
    x = torch.randn(2, 3, 10, 10)
    condensed = condense(masked)
    assert len(calls) == 1
    folded = fold_batchnorm(condensed)
    assert len(calls) == 2, "a separate fold_batchnorm call captures its own graph"
    torch.testing.assert_close(folded(x), masked.eval()(x), rtol=1e-5, atol=1e-5)
