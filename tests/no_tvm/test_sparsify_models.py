"""sparsify on real models: MLP, a ResNet-like CNN, nn.TransformerEncoder, Hugging Face BERT / ViT / GPT-2.

Every forward is compared with a *masked-dense reference*: a plain (never sparsified) copy of the model whose weights
are set to the sparsified model's masked weights. Invariant asserts sit inside the loop over layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import (
    SRigLConfig,
    TraceError,
    sparse_layers,
    sparsify,
)
from srigl_compile.nn.masked import is_masked
from srigl_compile.passes.discover import capture_graph, discover_layers
from tests.helpers import (
    assert_fresh_invariants,
    assert_same_classes,
    masked_dense_reference,
)
from tests.models import CNN_FAN_IN, SmallResNet, make_cnn, make_mlp

# -- helpers ----------------------------------------------------------------------------------------------------


# -- models -----------------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(16, 32)
        self.head_a = nn.Linear(32, 8)
        self.head_b = nn.Linear(32, 6)

    def forward(self, x):
        h = F.relu(self.trunk(x))
        return self.head_a(h), self.head_b(h)


class ShapeBranchingResNet(SmallResNet):
    """symbolic_trace cannot branch on a shape; torch.export (static shapes) can: forces the export path."""

    def forward(self, x):
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        return super().forward(x)


# -- 1. MLP (symbolic_trace) ------------------------------------------------------------------------------------


def test_mlp_discovery_marks_first_and_last():
    net = make_mlp()
    graph = capture_graph(net)
    assert graph.method == "symbolic_trace"
    marks = [(c.name, c.kind, c.shape, c.is_first, c.is_last) for c in discover_layers(net, graph)]
    assert marks == [
        ("0", "linear", (64, 20), True, False),
        ("2", "linear", (48, 64), False, False),
        ("4", "linear", (5, 48), False, True),
    ]


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_mlp_layers_fan_in_protection_and_forward(distribution):
    net = make_mlp()
    sparse = sparsify(net, SRigLConfig(sparsity=0.8, distribution=distribution, seed=3))
    layers = assert_fresh_invariants(sparse, ["0", "2", "4"])
    for name, layer in layers.items():
        assert isinstance(layer, nn.Linear), name
        assert layer.srigl_plan.protected == (name == "4"), name
        assert layer.srigl_plan.kind == "linear", name
    if distribution == "uniform":
        assert [layers[n].srigl_plan.k0 for n in ("0", "2", "4")] == [4, 12, 9]  # floor(floor(N * 0.2) / n_out)
    x = torch.randn(7, 20)
    reference = masked_dense_reference(net, sparse)
    torch.testing.assert_close(sparse(x), reference(x))
    # Same seed, same masks; another seed, other masks.
    again = sparsify(net, SRigLConfig(sparsity=0.8, distribution=distribution, seed=3))
    other = sparsify(net, SRigLConfig(sparsity=0.8, distribution=distribution, seed=4))
    for name, layer in layers.items():
        assert torch.equal(layer.mask, dict(sparse_layers(again))[name].mask), name
    assert any(not torch.equal(l.mask, dict(sparse_layers(other))[n].mask) for n, l in layers.items())


def test_mlp_reinit_std_and_reinit_false_keeps_weights():
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    torch.manual_seed(0)
    sparse = sparsify(net, SRigLConfig(sparsity=0.9, distribution="uniform"))
    for name, layer in sparse_layers(sparse):
        active = layer.weight.detach()[layer.mask]
        expected = math.sqrt(2.0 / layer.srigl_plan.k0)
        assert abs(active.std().item() - expected) < 0.1 * expected, name
    kept = sparsify(net, SRigLConfig(sparsity=0.9, distribution="uniform", reinit=False))
    for name, layer in sparse_layers(kept):
        torch.testing.assert_close(layer.weight.detach(), net.get_submodule(name).weight.detach() * layer.mask)


def test_two_headed_model_marks_both_heads_last_and_protected():
    net = TwoHeads()
    marks = {c.name: (c.is_first, c.is_last) for c in discover_layers(net, capture_graph(net))}
    assert marks == {"trunk": (True, False), "head_a": (False, True), "head_b": (False, True)}
    sparse = sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform"))
    for name, layer in sparse_layers(sparse):
        assert layer.srigl_plan.protected == name.startswith("head"), name
    x = torch.randn(3, 16)
    for got, want in zip(sparse(x), masked_dense_reference(net, sparse)(x)):
        torch.testing.assert_close(got, want)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.shared(F.relu(self.inp(x)))
        return self.head(self.shared(F.relu(h)))  # the same layer called twice


def test_layer_called_twice_is_one_sparse_layer():
    torch.manual_seed(0)
    net = Reused()
    marks = {c.name: (c.is_first, c.is_last, len(c.nodes)) for c in discover_layers(net, capture_graph(net))}
    assert marks == {"inp": (True, False, 1), "shared": (False, False, 2), "head": (False, True, 1)}
    sparse = sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform"))
    assert_fresh_invariants(sparse, ["inp", "shared", "head"])
    x = torch.randn(5, 8)
    torch.testing.assert_close(sparse(x), masked_dense_reference(net, sparse)(x))


class ScaledLinear(nn.Linear):
    """A user subclass that keeps nn.Linear's forward and adds a method."""

    def gain(self) -> float:
        return 2.0


def test_linear_subclass_keeps_its_class_and_methods():
    torch.manual_seed(0)
    net = nn.Sequential(ScaledLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparse = sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform"))
    assert is_masked(sparse[0])
    assert isinstance(sparse[0], ScaledLinear)
    assert sparse[0].gain() == 2.0
    # The run-time class still pickles (torch.save of the whole model) and unpickles in a fresh process.
    import io
    import subprocess
    import sys

    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    code = ("import io, sys, torch; sys.path.insert(0, '.'); from tests.no_tvm import test_sparsify_models; "
            "m = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False); "
            "assert m[0].gain() == 2.0 and int(m[0].mask.sum()) == int(m[0].mask.sum())")
    result = subprocess.run([sys.executable, "-c", code], input=buffer.getvalue(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


# -- 2. CNN with BatchNorm, residuals, grouped / depthwise convs, Conv1d -------------------------------------------


def test_cnn_fan_in_is_in_channels_over_groups_times_kernel():
    net = make_cnn()
    sparse = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform"))
    layers = assert_fresh_invariants(sparse, CNN_FAN_IN)
    kinds = {"stem": "conv2d", "block.conv1": "conv2d", "block.conv2": "conv2d", "block.down.0": "conv2d",
             "dw": "conv2d", "seq": "conv1d", "fc": "linear"}
    for name, layer in layers.items():
        plan = layer.srigl_plan
        assert plan.fan_in == CNN_FAN_IN[name], name
        assert plan.kind == kinds[name], name
        assert plan.n_out == layer.weight.shape[0], name
        # one output filter = one neuron: every filter has exactly k0 non-zeros (kernel positions included)
        per_filter = layer.mask.reshape(plan.n_out, -1).sum(dim=1)
        assert torch.all(per_filter == plan.k0), name
        assert plan.protected == (name == "fc"), name
    assert layers["dw"].srigl_plan.k0 == math.floor(32 * 9 * 0.4) // 32  # 3 of 9 per depthwise filter


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_cnn_forward_matches_masked_dense_reference(distribution):
    net = make_cnn()
    sparse = sparsify(net, SRigLConfig(sparsity=0.7, distribution=distribution, too_small="dense"))
    assert_fresh_invariants(sparse)
    reference = masked_dense_reference(net, sparse)
    x = torch.randn(4, 3, 8, 8)
    sparse.eval(), reference.eval()
    torch.testing.assert_close(sparse(x), reference(x))
    sparse.train(), reference.train()  # batch statistics, and the running stats move identically
    torch.testing.assert_close(sparse(x), reference(x))
    sparse_buffers = dict(sparse.named_buffers())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(sparse_buffers[name], buffer)


def test_cnn_class_unchanged_and_batchnorm_untouched():
    net = make_cnn()
    sparse = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform"))
    assert_same_classes(net, sparse)
    bns = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5
    for name, bn in bns:
        sparse_bn = sparse.get_submodule(name)
        assert type(sparse_bn) is nn.BatchNorm2d, name
        assert not hasattr(sparse_bn, "mask"), name
        for key, value in bn.state_dict().items():
            assert torch.equal(sparse_bn.state_dict()[key], value), (name, key)
    assert sparse.training == net.training


def test_cnn_export_path_keeps_batchnorm_state_and_training_flags():
    net = make_cnn(ShapeBranchingResNet)
    with pytest.raises(TraceError, match="example_inputs"):
        sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform"))
    assert capture_graph(net, torch.randn(2, 3, 16, 16)).method == "export"
    net.train()
    net.dw_bn.eval()  # a mixed train/eval state must come back as it was
    sparse = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform"), example_inputs=torch.randn(2, 3, 16, 16))
    assert_fresh_invariants(sparse, CNN_FAN_IN)
    for (name, m), (_, m0) in zip(sparse.named_modules(), net.named_modules()):
        assert m.training == m0.training, name
        if isinstance(m, nn.BatchNorm2d):
            for key, value in m0.state_dict().items():
                assert torch.equal(m.state_dict()[key], value), (name, key)
    x = torch.randn(4, 3, 16, 16)
    reference = masked_dense_reference(net, sparse)
    torch.testing.assert_close(sparse(x), reference(x))
