"""torch.compile follows the dense-form choices eager calls made (``nn.traced_dense``): a dense choice is one
``dense_form`` call computing what the eager call computes; other shapes, dynamic shapes, export and fx run the
kernel; a compiled call checks the layer's operands as an eager call does; graphs of models without dense forms are
not reused for models with them."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.nn import traced_dense

from .dense_forms import Block, chosen_dense, force, forms_of

pytestmark = pytest.mark.tvm


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean dynamo: after a frame saw another batch size (an earlier test's), torch's
    automatic dynamic shapes would trace it dynamic, which runs the kernel (module docstring of nn.traced_dense)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Pooled(nn.Module):
    """A stem (conv, BN, ReLU, max-pool: fused into one banded module) before the block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.pool, self.block = nn.MaxPool2d(2), Block()

    def forward(self, x):
        return self.block(self.pool(self.relu(self.bn(self.conv(x)))))


def _graphs_of(compiled_calls: list) -> callable:
    """A torch.compile backend keeping each graph it is given (then running it as aot_eager would)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(gm, inputs):
        compiled_calls.append([str(node.target) for node in gm.graph.nodes])
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep)


@pytest.mark.parametrize("path", ["dense", "kernel"])
def test_compiled_calls_take_the_path_eager_calls_chose(monkeypatch, short_trials, path):
    """torch.compile follows each shape's choice made eagerly (``nn.traced_dense``): a dense choice is one
    ``dense_form`` call computing what the eager call computes, bit for bit; a shape without a choice, or a kernel
    choice, runs the kernel; a fused conv + max-pool whose convolution chose dense runs unfused."""
    torch.manual_seed(0)
    model = sparsify(_Pooled().eval(), SRigLConfig(sparsity=0.5, distribution="uniform"),
                     example_inputs=(torch.randn(2, 16, 20, 20),))
    lowered = lower(model, progress=False)
    kernels_only = lower(model, LlvmConfig(dense_fallback=False, progress=False))
    assert type(lowered.pool).__name__ == "LoweredConvMaxPool"
    force(monkeypatch, path)
    x, other = torch.randn(2, 16, 20, 20), torch.randn(3, 16, 20, 20)
    with torch.no_grad():
        for _ in range(3):
            want = lowered(x)
        forms = [form for form in forms_of(lowered).values() if form is not None]
        assert len(forms) == 5 and all(list(form.choices.values()) == [path == "dense"] for form in forms)
        graphs = []
        compiled = torch.compile(lowered, fullgraph=True, backend=_graphs_of(graphs))
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
        targets = graphs[-1]
        assert sum("dense_form" in t for t in targets) == (5 if path == "dense" else 0)
        assert sum("tvm_conv" in t or "tvm_condensed" in t for t in targets) == (0 if path == "dense" else 5)
        torch.testing.assert_close(compiled(other), kernels_only(other), rtol=0, atol=0)  # (no choice: kernels)
        assert not any("dense_form" in t for t in graphs[-1])
    key = lowered.pool.conv._traced_dense_key if path == "dense" else traced_dense._registered(lowered.pool.conv)
    torch.library.opcheck(torch.ops.srigl_compile.dense_form.default, (x, None, key))


def test_a_graph_traced_for_a_layer_without_a_dense_form_is_not_reused_for_one_with_it(monkeypatch, short_trials):
    """Dynamo shares a graph among the instances of a module class unless a guard tells them apart: the traced
    path reads the form with a getattr dynamo guards on (a graph of kernels had served the model with forms)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 7, 7)
    sparse = sparsify(nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.ReLU()).eval(),
                      SRigLConfig(sparsity=0.5, distribution="uniform"), example_inputs=(x,))
    lowered = lower(sparse, progress=False)
    kernels_only = lower(sparse, LlvmConfig(dense_fallback=False, progress=False))
    force(monkeypatch, "dense")
    graphs = []
    backend = _graphs_of(graphs)
    with torch.no_grad():
        for _ in range(2):
            want = lowered(x)
        assert all(lowered[0]._dense_form.choices.values())
        torch.compile(kernels_only, backend=backend)(x)
        torch.testing.assert_close(torch.compile(lowered, backend=backend)(x), want, rtol=0, atol=0)
    assert len(graphs) == 2 and sum("dense_form" in t for t in graphs[1]) == 1


def test_a_compiled_dense_path_sees_operands_changed_in_place_and_export_keeps_the_kernel(monkeypatch, short_trials):
    """The dense weight is a copy of the layer's operands: a compiled call checks them as an eager call does and,
    changed (``load_state_dict`` into a compiled model), drops the form and runs the kernel on the new operands
    (a compiled graph still tracing the dense path would return the old bias).
    An exported program calls no process-local form: the kernels."""
    model, lowered, x = chosen_dense(monkeypatch)
    with torch.no_grad():
        compiled = torch.compile(lowered, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        state = {name: 2 * t if name == "block.fc.bias" else t for name, t in lowered.state_dict().items()}
        lowered.load_state_dict(state)
        model.block.fc.bias.mul_(2)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert not any(forms_of(lowered).values())  # (load_state_dict copied every operand in place)
        program = torch.export.export(lowered, (x,))
        assert not [node for node in program.graph.nodes if "dense_form" in str(node.target)]
        kernels_only = lower(model, LlvmConfig(dense_fallback=False, progress=False))
        torch.testing.assert_close(program.module()(x), kernels_only(x), rtol=0, atol=0)


def test_dynamic_shapes_compile_one_graph_for_every_batch(monkeypatch, short_trials):
    """Choices are per concrete shape: a lookup by a dynamic size specialized it, so every batch size compiled a
    graph of its own (and mark_dynamic failed). Dynamic sizes now match no choice and run the kernel."""
    from torch._dynamo.utils import counters

    model, lowered, x = chosen_dense(monkeypatch)  # (dense chosen at batch 2)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lowered, backend="aot_eager", dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in range(1, 6):
            x = torch.randn(batch, 16, 10, 10)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] <= 2  # (batch 1 is specialized by torch, the rest dynamic)
        torch._dynamo.reset()
        x = torch.randn(3, 16, 10, 10)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(torch.compile(lowered, backend="aot_eager")(x), model(x), rtol=1e-5, atol=1e-5)
