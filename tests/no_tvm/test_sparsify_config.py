"""sparsify's configuration (filter_fn, overrides, keep_first/last_dense, no_ablation, errors, inplace)
and the global density it reaches; models and helpers come from test_sparsify_models.py."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import (
    ConfigError,
    LayerError,
    SRigLConfig,
    sparse_layers,
    sparsify,
)
from tests.helpers import assert_fresh_invariants, collect_warnings, masked_dense_reference
from tests.models import CNN_FAN_IN, make_cnn, make_encoder, make_mlp

# -- 5. configuration: filter_fn, overrides, keep_first/last_dense, no_ablation, errors, inplace ----------


def test_filter_fn_keeps_rejected_layers_dense():
    net = make_mlp()
    seen = []

    def keep(module, name):
        seen.append((type(module), name))
        return name != "2"

    sparse = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform"), filter_fn=keep)
    assert seen == [(nn.Linear, "0"), (nn.Linear, "2"), (nn.Linear, "4")]
    assert_fresh_invariants(sparse, ["0", "4"])
    assert type(sparse[2]) is nn.Linear
    assert torch.equal(sparse[2].weight, net[2].weight)
    assert sparse[4].srigl_plan.protected


def test_overrides_by_name_and_regex():
    net = make_cnn()
    overrides = {"fc": None, r"block\.conv\d": 0.75, "stem": 0.3}
    sparse = sparsify(net, SRigLConfig(sparsity=0.6, distribution="erk", overrides=overrides, too_small="dense"))
    layers = dict(sparse_layers(sparse))
    assert "fc" not in layers and type(sparse.fc) is nn.Linear
    assert torch.equal(sparse.fc.weight, net.fc.weight)
    for name, sparsity in (("block.conv1", "0.75"), ("block.conv2", "0.75"), ("stem", "0.3")):
        layer = layers[name]
        plan = layer.srigl_plan
        numel = layer.weight.numel()
        assert plan.density == pytest.approx(1 - float(sparsity), abs=1e-12), name
        assert plan.budget == math.floor(numel * (1 - Fraction(sparsity))), name
        assert plan.k0 == plan.budget // plan.n_out, name
        assert int(layer.mask.sum()) == plan.k0 * plan.n_out, name
        assert (1 - Fraction(sparsity)) * numel - int(layer.mask.sum()) < plan.n_out + 1, name
    # an exact name wins over a regex that also matches it
    sparse = sparsify(make_mlp(), SRigLConfig(sparsity=0.5, distribution="uniform", overrides={"2": 0.9, r"\d": None}))
    assert sorted(n for n, _ in sparse_layers(sparse)) == ["2"]
    assert sparse[2].srigl_plan.k0 == math.floor(48 * 64 * Fraction("0.1")) // 48


def test_keep_first_and_last_dense():
    net = make_cnn()
    config = SRigLConfig(sparsity=0.6, distribution="uniform")
    first = dict(sparse_layers(sparsify(net, config.replace(keep_first_dense=True))))
    assert set(first) == set(CNN_FAN_IN) - {"stem"}
    last = dict(sparse_layers(sparsify(net, config.replace(keep_last_dense=True))))
    assert set(last) == set(CNN_FAN_IN) - {"fc"}
    both = sparsify(net, config.replace(keep_first_dense=True, keep_last_dense=True))
    assert set(n for n, _ in sparse_layers(both)) == set(CNN_FAN_IN) - {"stem", "fc"}
    assert type(both.stem) is nn.Conv2d and type(both.fc) is nn.Linear
    for name, layer in sparse_layers(both):
        assert not layer.srigl_plan.protected, name  # fc (the output layer) is dense, "seq" feeds it: not last


def test_no_ablation_patterns_protect_layers():
    net = make_encoder()
    config = SRigLConfig(sparsity=0.7, distribution="uniform", no_ablation=("layers.0.linear1", r".*\.in_proj"))
    sparse = sparsify(net, config, example_inputs=torch.randn(2, 4, 32))
    protected = {"layers.0.linear1", "layers.0.self_attn.in_proj", "layers.1.self_attn.in_proj", "layers.1.linear2"}
    for name, layer in sparse_layers(sparse):
        assert layer.srigl_plan.protected == (name in protected), name


def test_override_or_no_ablation_matching_no_layer_is_a_config_error():
    net = make_mlp()
    with pytest.raises(ConfigError, match="'fc'") as info:
        sparsify(net, SRigLConfig(overrides={"fc": None}))
    assert "'0'" in str(info.value)  # lists the layers there are
    with pytest.raises(ConfigError, match="matches no"):
        sparsify(net, SRigLConfig(overrides={r"layer\d+": 0.5}))
    with pytest.raises(ConfigError, match="head"):
        sparsify(net, SRigLConfig(no_ablation=("head",)))
    # a key naming a layer that filter_fn removed matches nothing either
    with pytest.raises(ConfigError, match="'2'"):
        sparsify(net, SRigLConfig(overrides={"2": 0.5}), filter_fn=lambda m, name: name != "2")


def test_too_small_layer_raises_layer_error_or_stays_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 40))
    config = SRigLConfig(sparsity=0.5, distribution="uniform", overrides={"2": 0.99})  # budget 25 < 40 neurons
    with pytest.raises(LayerError, match=r"layer '2'.*k would be 0"):
        sparsify(net, config)
    with pytest.warns(UserWarning, match=r"too_small='dense': layers \['2'\] would get a constant fan-in of 0"):
        sparse = sparsify(net, config.replace(too_small="dense"))  # (named: a probe found them kept silently)
    assert [n for n, _ in sparse_layers(sparse)] == ["0"]
    assert type(sparse[2]) is nn.Linear
    assert torch.equal(sparse[2].weight, net[2].weight)


def test_sparsifying_twice_is_a_layer_error():
    sparse = sparsify(make_mlp(), SRigLConfig(sparsity=0.8))
    with pytest.raises(LayerError, match="already sparsified"):
        sparsify(sparse, SRigLConfig(sparsity=0.8))
    with pytest.raises(LayerError, match="already sparsified"):
        sparsify(sparse, SRigLConfig(sparsity=0.8), inplace=True)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 32)
        self.dec = nn.Linear(32, 16)
        self.out = nn.Linear(16, 16)
        self.out.weight = self.enc.weight

    def forward(self, x):
        return self.out(F.relu(self.dec(F.relu(self.mid(self.enc(x))))))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.spare = nn.Linear(32, 32)  # registered, never called
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_tied_weights_stay_dense_with_a_warning():
    torch.manual_seed(0)
    net = Tied()
    sparse, caught = collect_warnings(lambda: sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform")))
    assert sorted(n for n, _ in sparse_layers(sparse)) == ["dec", "mid"]
    for name in ("enc", "out"):
        assert any(f"'{name}'" in w and "tied" in w for w in caught), (name, caught)
        assert type(getattr(sparse, name)) is nn.Linear, name
    assert sparse.out.weight is sparse.enc.weight
    assert torch.equal(sparse.enc.weight, net.enc.weight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), masked_dense_reference(net, sparse)(x))


def test_module_never_used_in_forward_stays_dense_with_a_warning():
    torch.manual_seed(0)
    net = Unused()
    sparse, caught = collect_warnings(lambda: sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform")))
    assert sorted(n for n, _ in sparse_layers(sparse)) == ["a", "b"]
    assert any("'spare'" in w and "never used" in w for w in caught), caught
    assert type(sparse.spare) is nn.Linear
    assert sparse.b.srigl_plan.protected and not sparse.a.srigl_plan.protected


def test_inplace_false_leaves_the_original_untouched_and_inplace_true_rewrites_it():
    net = make_cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    classes = {n: type(m) for n, m in net.named_modules()}
    sparse = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform"))
    assert sparse is not net
    assert {n: type(m) for n, m in net.named_modules()} == classes
    assert net.state_dict().keys() == state.keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name, module in net.named_modules():
        assert not hasattr(module, "mask") and not hasattr(module, "srigl_plan"), name
    for (name, p), (_, q) in zip(net.named_parameters(), sparse.named_parameters()):
        assert p.data_ptr() != q.data_ptr(), name  # no shared storage
    rewritten = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform"), inplace=True)
    assert rewritten is net
    assert_fresh_invariants(net, CNN_FAN_IN)


# -- 6. global density: ERK and uniform -----------------------------------------------------------------------------


class Wide(nn.Module):
    """Layers of very different sizes, none small enough for ERK to make it dense at 90% sparsity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 32)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv(x)))).mean(dim=(2, 3))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))


def _density_bounds(target: float, layers: dict, numel: int, n_candidates: int) -> tuple[float, float]:
    """Bounds on the non-zeros of all candidate layers (``numel`` weights, ``n_candidates`` layers, the ones made
    dense counted fully). Each sparse layer loses < 1 non-zero per neuron (k0 = budget // n_out) and < 1 to its
    budget's floor(N d); each candidate's share of the global budget rounds up by < 1 (N - int(N (1 - D)))."""
    slack = sum(layer.srigl_plan.n_out + 1 for layer in layers.values())
    return target * numel - slack, target * numel + n_candidates


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_global_density_over_sparse_layers_matches_target(distribution, sparsity):
    net = Wide()
    sparse = sparsify(net, SRigLConfig(sparsity=sparsity, distribution=distribution))
    layers = assert_fresh_invariants(sparse)
    all_layers = ["conv", "conv2", "fc1", "fc2", "fc3"]
    dense = [n for n in all_layers if n not in layers]  # ERK at 50% makes fc1 and fc3 dense (density > 1)
    assert dense == ([] if (distribution, sparsity) != ("erk", 0.5) else ["fc1", "fc3"])
    dense_numel = sum(sparse.get_submodule(n).weight.numel() for n in dense)
    numel = sum(sparse.get_submodule(n).weight.numel() for n in all_layers)
    nnz = sum(int(layer.mask.sum()) for layer in layers.values()) + dense_numel
    low, high = _density_bounds(1 - sparsity, layers, numel, len(all_layers))
    assert low <= nnz <= high, (nnz, low, high)
    assert abs(nnz / numel - (1 - sparsity)) < 0.01
    budgets = sum(layer.srigl_plan.budget for layer in layers.values()) + dense_numel
    assert abs(budgets - (1 - sparsity) * numel) <= len(all_layers)
    if distribution == "uniform":
        for name, layer in layers.items():
            assert layer.srigl_plan.density == pytest.approx(1 - sparsity), name


def test_erk_densifies_small_layers_and_keeps_the_global_density():
    """On the small CNN ERK makes the tiniest layers dense; the global density counts them as dense."""
    net = make_cnn()
    config = SRigLConfig(sparsity=0.8, distribution="erk", too_small="dense")
    sparse = sparsify(net, config)
    layers = dict(sparse_layers(sparse))
    dense = set(CNN_FAN_IN) - set(layers)
    assert dense, "expected ERK to make some small layer dense"
    numel = sum(sparse.get_submodule(n).weight.numel() for n in CNN_FAN_IN)
    nnz = sum(int(layer.mask.sum()) for layer in layers.values())
    nnz += sum(sparse.get_submodule(n).weight.numel() for n in dense)
    low, high = _density_bounds(1 - 0.8, layers, numel, len(CNN_FAN_IN))
    assert low <= nnz <= high, (nnz, low, high)


def test_erk_gives_smaller_layers_larger_density():
    sparse = sparsify(Wide(), SRigLConfig(sparsity=0.9, distribution="erk"))
    plans = {name: layer.srigl_plan for name, layer in sparse_layers(sparse)}
    raw = {name: sum(layer.weight.shape) / layer.weight.numel() for name, layer in sparse_layers(sparse)}
    linears = sorted(("fc1", "fc2", "fc3"), key=lambda n: sparse.get_submodule(n).weight.numel())
    assert linears == ["fc3", "fc1", "fc2"]
    for smaller, larger in zip(linears, linears[1:]):
        assert plans[smaller].density > plans[larger].density, (smaller, larger)
    for name in plans:  # density proportional to (sum of dims) / (product of dims)
        assert plans[name].density / plans["fc2"].density == pytest.approx(raw[name] / raw["fc2"], rel=1e-9), name
    assert plans["conv"].density > plans["conv2"].density  # same kernel, fewer channels
    assert max(p.density for p in plans.values()) < 1.0
