"""What sparsify and its discovery check, name and protect: whole-name matches for no_ablation and overrides, the
warnings for layers left dense or unknown, the output layer found before filters, weights read directly,
non-finite masked weights, and a dense checkpoint's packed attention weight loading. Each test failed on a
mutant the rest of the suite let through (mutation probe, session 43)."""

import math

import pytest
import torch
import torch.nn as nn

from srigl_compile import ConfigError, LayerError, SRigLConfig, sparse_layers, sparsify
from srigl_compile.nn.masked import LayerPlan
from srigl_compile.passes.analysis import Analyses
from srigl_compile.passes.manager import PassManager
from srigl_compile.passes.sparsify import SparsifyPass
from tests.helpers import collect_warnings

UNIFORM = SRigLConfig(sparsity=0.75, distribution="uniform")


class Prefixed(nn.Module):
    """Layer names where one is a prefix of another (fc, fc2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc(x)))))


def test_no_ablation_names_match_whole_names_not_prefixes():
    """A no_ablation entry protects the layer it names, not every layer whose name starts with it."""
    torch.manual_seed(0)
    sparse = sparsify(Prefixed(), SRigLConfig(sparsity=0.75, distribution="uniform", no_ablation=("fc",)))
    protected = {name: layer.srigl_plan.protected for name, layer in sparse_layers(sparse)}
    assert protected == {"fc": True, "fc2": False, "head": True}


def test_override_key_that_only_prefixes_a_layer_name_matches_no_layer():
    """An overrides key that is only a prefix of a layer name ('fc' of 'fc2' with no 'fc') is refused, not
    silently ignored."""
    class Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Linear(16, 32)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(x)))

    with pytest.raises(ConfigError, match="matches no"):
        sparsify(Only(), SRigLConfig(overrides={"fc": None}))


def test_sparsify_that_leaves_every_layer_dense_says_so():
    """Keep_first_dense + keep_last_dense on a two-layer MLP leave nothing sparse: a warning says so."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = SRigLConfig(sparsity=0.5, distribution="uniform", keep_first_dense=True, keep_last_dense=True)
    sparse, messages = collect_warnings(lambda: sparsify(net, config))
    assert not list(sparse_layers(sparse))
    assert any("nothing will be sparse" in m for m in messages), messages


class _AblatesEveryLayer(SparsifyPass):
    """A subclass whose masks ablate neuron 0 of every layer, the protected output layer included."""

    def initial_mask(self, candidate, plan: LayerPlan, generator):
        mask = torch.zeros(plan.n_out, plan.fan_in, dtype=torch.bool)
        k = plan.budget // (plan.n_out - 1)
        for row in range(1, plan.n_out):
            mask[row, torch.randperm(plan.fan_in, generator=generator)[:k]] = True
        return mask


def test_a_subclass_ablating_a_protected_layer_is_refused():
    """SparsifyPass.ensures refuses a mask that ablates neurons of a protected (output) layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(LayerError, match="protected True"):
        PassManager([_AblatesEveryLayer(UNIFORM)]).run(net, Analyses())


def test_non_finite_weights_under_the_mask_are_refused():
    """With reinit=False a masked weight that is inf stays NaN after masking (inf * 0): sparsify refuses
    instead of returning a model whose masked weights are not zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].weight.fill_(math.inf)
    with pytest.raises(LayerError, match="masked weights are not zero"):
        sparsify(net, SRigLConfig(sparsity=0.75, distribution="uniform", reinit=False))


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own: its masked form is unknown."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_a_linear_subclass_overriding_forward_stays_dense_with_a_warning():
    """The layer is skipped, and the user is told so (not only a log line)."""
    torch.manual_seed(0)
    net = nn.Sequential(ScaledLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparse, messages = collect_warnings(lambda: sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform")))
    assert [name for name, _ in sparse_layers(sparse)] == ["2"]
    assert type(sparse[0]) is ScaledLinear
    assert any("'0'" in m and "overrides forward" in m for m in messages), messages


class FunctionalWeight(nn.Module):
    """A module with its own 2-D weight used by F.linear: sparsify has no masked form for it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_a_module_with_a_weight_matrix_but_no_masked_form_is_named_in_a_warning():
    """A 2-D weight of an unsupported module stays dense with a warning (not only 3-D+ weights)."""
    torch.manual_seed(0)
    net = nn.Sequential(FunctionalWeight(), nn.ReLU(), nn.Linear(32, 4))
    sparse, messages = collect_warnings(lambda: sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform")))
    assert [name for name, _ in sparse_layers(sparse)] == ["2"]
    assert any("'0'" in m and "no masked form" in m for m in messages), messages


class AppliedTwiceAtTheEnd(nn.Module):
    """The output layer is applied twice in a row (a weight-shared head): it is still the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        return self.head(torch.relu(self.head(torch.relu(self.body(x)))))


def test_a_layer_applied_twice_at_the_end_is_still_the_protected_output_layer():
    """A layer's own second call downstream of its first does not make it a non-output layer."""
    torch.manual_seed(0)
    sparse = sparsify(AppliedTwiceAtTheEnd(), SRigLConfig(sparsity=0.75, distribution="uniform"))
    protected = {name: layer.srigl_plan.protected for name, layer in sparse_layers(sparse)}
    assert protected == {"body": False, "head": True}


def test_first_and_last_are_marked_before_filter_fn_removes_layers():
    """Filtering out the classifier does not turn the layer before it into the output layer: it is neither
    protected nor kept dense by keep_last_dense."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    config = SRigLConfig(sparsity=0.75, distribution="uniform", keep_last_dense=True)
    sparse = sparsify(net, config, filter_fn=lambda module, name: name != "4")
    layers = dict(sparse_layers(sparse))
    assert sorted(layers) == ["0", "2"]
    assert not layers["2"].srigl_plan.protected


class ReadsItsLinearFunctionally(nn.Module):
    """The forward reads ``self.proj``'s weight and bias with F.linear instead of calling ``self.proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)
        return self.head(torch.relu(h))


def test_a_linear_whose_weight_the_forward_reads_directly_is_found_and_masked():
    """A weight read by get_attr (not by a call of its module) counts as used by the forward."""
    torch.manual_seed(0)
    net = ReadsItsLinearFunctionally()
    sparse = sparsify(net, SRigLConfig(sparsity=0.75, distribution="uniform"))
    assert [name for name, _ in sparse_layers(sparse)] == ["proj", "head"]
    x = torch.randn(3, 16)
    expected = sparse.head(torch.relu(x @ (sparse.proj.weight * sparse.proj.mask).T + sparse.proj.bias))
    torch.testing.assert_close(sparse(x), expected)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_a_dense_state_dict_loads_its_in_proj_weight_into_the_masked_projection():
    """The dense key ``attn.in_proj_weight`` loads into ``attn.in_proj.weight`` (the documented behaviour of
    MaskedMultiheadAttention), not dropped as an unexpected key."""
    torch.manual_seed(0)
    dense = _SelfAttention()
    sparse = sparsify(dense, SRigLConfig(sparsity=0.5, distribution="uniform"))
    assert not torch.equal(sparse.attn.in_proj.weight, dense.attn.in_proj_weight)  # reinit redrew it
    result = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert "attn.in_proj_weight" not in result.unexpected_keys
    torch.testing.assert_close(sparse.attn.in_proj.weight, dense.attn.in_proj_weight, rtol=0, atol=0)
