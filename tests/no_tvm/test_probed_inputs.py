"""Inputs a probe of the public API (2026-12-06, 276 cases) found refused late, silently or unclearly: each is now a
typed error naming the field and the fix, raised before anything changes, or is handled as meant."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import transformers

from srigl_compile import (
    CheckpointError,
    ConfigError,
    LayerError,
    ReplayError,
    SRigLConfig,
    SRigLUpdater,
    condense,
    cpu_graph,
    fold_batchnorm,
    from_sparse_weights,
    prune,
    sparse_layers,
    sparsify,
)

UNIFORM = SRigLConfig(sparsity=0.5, distribution="uniform", delta_t=5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4)).eval()


@pytest.mark.parametrize("fields, words", [
    ({"no_ablation": None}, "no_ablation=None must be a list"),
    ({"no_ablation": 5}, "no_ablation=5 must be a list"),
    ({"seed": 2**70}, "must be below 2\\*\\*63 - 1"),
    ({"overrides": {"0": False}}, "overrides\\['0'\\]=False must be a sparsity in \\(0, 1\\), or None"),
])
def test_config_fields_of_the_wrong_kind(fields, words):
    with pytest.raises(ConfigError, match=words):
        SRigLConfig(**fields)


def test_from_dict_takes_a_mapping_and_no_string_for_a_list():
    for data in (None, [("sparsity", 0.9)]):
        with pytest.raises(ConfigError, match="from_dict takes a mapping"):
            SRigLConfig.from_dict(data)
    with pytest.raises(ConfigError, match="no_ablation='fc' must be a list"):  # (was ('f', 'c'))
        SRigLConfig.from_dict({"no_ablation": "fc"})
    assert SRigLConfig.from_dict({"no_ablation": ["fc"]}).no_ablation == ("fc",)


def test_a_large_erk_power_gives_finite_densities():
    """(sum / prod) ** 1e6 underflowed to 0 for every layer, and the ERK scale divided by zero. The limit: the
    budget goes to the layers by score, each dense before the next gets any (3: 256 of 256, 0: 512 of 512, then
    2: the 128 left of 1024)."""
    model = sparsify(_mlp(), SRigLConfig(sparsity=0.5, erk_power=1e6))
    assert {name: int(layer.mask.sum()) for name, layer in sparse_layers(model)} == {"2": 128}


class _Gpt2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = transformers.pytorch_utils.Conv1D(8, 4)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.c(x))


@pytest.mark.parametrize("call", ["sparsify", "prune", "from_sparse_weights"])
def test_a_refused_in_place_call_leaves_conv1d_layers_as_they_were(call):
    """The Conv1D -> Linear rewrite ran before the checks, and stayed when they refused the call."""
    model = _Gpt2Like()
    conv = model.c
    bad = SRigLConfig(sparsity=0.5, overrides={"nope": 0.5})
    with pytest.raises((ConfigError, LayerError)):
        if call == "sparsify":
            sparsify(model, bad, inplace=True)
        elif call == "prune":
            prune(model, bad, inplace=True)
        else:
            from_sparse_weights(model, inplace=True)  # (no zero weights: refused)
    assert model.c is conv


def _updater(model, **kwargs):
    return SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), UNIFORM, 100, **kwargs)


def test_a_frozen_sparse_layer_is_refused_before_any_hook():
    model = sparsify(_mlp(), UNIFORM)
    model[2].weight.requires_grad_(False)
    with pytest.raises(LayerError, match=r"layers \['2'\] have frozen weights \(requires_grad=False\).*\{'2': None\}"):
        _updater(model)
    assert not model[0].weight._backward_hooks  # (a hook was left behind, masking layer 0's gradients)


def test_a_second_updater_on_the_same_layers_replaces_the_first():
    """Two updaters on one model each hooked every weight and each updated the masks: the newer takes over."""
    model = sparsify(_mlp(), UNIFORM)
    first = _updater(model)
    with pytest.raises(TypeError, match="grad_scaler"):  # (refused: the first keeps working)
        _updater(model, grad_scaler=1.0)
    assert first.step() is False
    with pytest.warns(UserWarning, match="this one replaces it"):
        second = _updater(model)
    with pytest.raises(ConfigError, match="replaced by a newer one built on the same layers"):
        first.step()
    assert len(model[0].weight._backward_hooks) == 1  # (the second's alone)
    second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (closed: nothing to replace)
        _updater(model)
        _updater(copy.deepcopy(model))  # (a copy is a model of its own)
    assert len(model[0].weight._backward_hooks) == 1


def test_updater_arguments_of_other_kinds():
    model = sparsify(_mlp(), UNIFORM)
    with pytest.raises(TypeError, match="grad_scaler must be the torch.amp.GradScaler"):
        _updater(model, grad_scaler=1.0)
    updater = SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), UNIFORM, np.int64(10))
    assert updater.total_steps == 10 and type(updater.total_steps) is int


def test_a_checkpoint_with_a_non_finite_gradient_window_is_refused():
    model = sparsify(_mlp(), UNIFORM)
    updater = _updater(model)
    state = updater.state_dict()
    state["grad_buffers"] = {name: torch.full_like(layer.weight, float("nan"))
                             for name, layer in sparse_layers(model)}
    updater.close()
    fresh = _updater(model)
    with pytest.raises(CheckpointError, match="NaN/inf entries: the run diverged before it was saved"):
        fresh.load_state_dict(state)
    assert fresh.step_count == 0


def test_wanda_reads_a_one_shot_iterator_once_for_both_its_uses():
    """Wanda used up a generator, and the BatchNorm recalibration then found it empty, after pruning in place."""
    model = _cnn()
    batches = (torch.randn(4, 3, 8, 8) for _ in range(2))
    pruned = prune(model, UNIFORM, "wanda", calibration=batches, recalibrate_batchnorm=True, inplace=True)
    assert bool(pruned[1].running_mean.ne(0).any())


@pytest.mark.parametrize("calibration, words", [
    ([torch.full((4, 3, 8, 8), float("nan"))], "NaN or inf features"),
    ([torch.randn(4, 3, 8, 8).index_fill_(0, torch.tensor([1]), float("inf"))], "NaN or inf features"),
    ([torch.randn(0, 3, 8, 8)], "is zero \\(empty batches\\?\\)"),
])
def test_wanda_refuses_calibration_that_gives_no_real_feature_norms(calibration, words):
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=words):
        prune(model, UNIFORM, "wanda", calibration=calibration, inplace=True)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not list(sparse_layers(model))


def test_prune_flags_and_ignored_calibration():
    with pytest.raises(ConfigError, match="ablation='yes' must be True or False"):
        prune(_mlp(), UNIFORM, ablation="yes")
    with pytest.warns(UserWarning, match="reads no calibration inputs"):
        prune(_mlp(), UNIFORM, "magnitude", calibration=[torch.randn(2, 16)])


def test_from_sparse_weights_refuses_a_non_finite_weight():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
        model[0].weight[0, 1] = float("nan")
    with pytest.raises(LayerError, match="layer '0' has NaN or inf weights"):
        from_sparse_weights(model)


def test_condensed_layers_check_their_inputs():
    """A condensed Linear gathered from a prefix of a wider input, and a conv from the first channels."""
    condensed = condense(sparsify(_cnn(), UNIFORM))
    with torch.no_grad():
        condensed(torch.randn(2, 3, 8, 8))
        with pytest.raises(LayerError, match="expects inputs with 3 channels, got shape \\(2, 4, 8, 8\\)"):
            condensed(torch.randn(2, 4, 8, 8))
        with pytest.raises(LayerError, match="CondensedConv needs images at least as large as its kernel \\(3, 3\\)"):
            condensed[0](torch.randn(2, 3, 2, 2))
        linear = condense(sparsify(_mlp(), UNIFORM))
        for x, words in ((torch.randn(2, 17), "16 features"), (torch.randn(2, 15), "16 features"),
                         (torch.ones(2, 16, dtype=torch.int64), "floating-point input")):
            with pytest.raises(LayerError, match=words):
                linear(x)


def test_whole_model_calls_name_a_model_of_another_kind():
    for call in (condense, fold_batchnorm):
        with pytest.raises(TypeError, match=f"{call.__name__} expects an nn.Module, not str"):
            call("model")
    with pytest.raises(TypeError, match="shrink='no' must be True or False"):
        condense(sparsify(_mlp(), UNIFORM), shrink="no")
    with pytest.raises(ReplayError, match="max_recordings must be >= 1, got '3' \\(an integer"):
        cpu_graph(_mlp(), max_recordings="3")


def test_weights_written_outside_the_mask_stop_the_next_update():
    """The update zeroed what it dropped before ``check_invariants`` looked, erasing the sign: checked first now."""
    from srigl_compile import InvariantError

    model = sparsify(_mlp(), UNIFORM)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigLUpdater(model, optimizer, UNIFORM, 100)
    with torch.no_grad():
        model[2].weight[~model[2].mask] = 0.5
    x = torch.randn(8, 16)
    for step in range(1, UNIFORM.delta_t + 1):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if step < UNIFORM.delta_t:
            assert not updater.step()
    with pytest.raises(InvariantError, match=f"layer '2': weights outside its mask are not zero at the mask update "
                                             f"of step {UNIFORM.delta_t}"):
        updater.step()


@pytest.mark.parametrize("fields", [{"keep_first_dense": True}, {"overrides": {".*": None}}])
def test_sparsify_says_so_when_it_leaves_every_layer_dense(fields):
    with pytest.warns(UserWarning, match=r"sparsify left every layer of Sequential dense \(layers \['0'\]"):
        model = sparsify(nn.Sequential(nn.Linear(16, 8)), SRigLConfig(sparsity=0.5, **fields))
    assert not list(sparse_layers(model))


def test_a_filter_fn_of_another_signature_says_which_it_must_have():
    with pytest.raises(ConfigError, match=r"filter_fn is called as filter_fn\(module, name\) -> bool, and failed so "
                                          r"on layer '0': .*takes 1 positional argument but 2 were given"):
        sparsify(_mlp(), UNIFORM, filter_fn=lambda name: True)


def test_a_parameter_assigned_to_a_condensed_operand_is_refused():
    """It left the layer's buffers, and the next lowered call raised KeyError: 'bias'."""
    condensed = condense(sparsify(_mlp(), UNIFORM))
    bias = condensed[0].bias
    with pytest.raises(LayerError, match=r"CondensedLinear.bias is a buffer of the condensed layer, not a parameter"):
        condensed[0].bias = nn.Parameter(torch.zeros_like(bias))
    assert condensed[0].bias is bias
    condensed[0].bias = torch.zeros_like(bias)  # (a plain tensor: a buffer still)
    assert "bias" in condensed[0]._buffers


def test_a_gamma_sal_count_no_neuron_can_reach_is_named_with_its_layers():
    """gamma_sal=1e9 was accepted silently; every update then ablates as many neurons as the budget allows."""
    def updater(model, gamma_sal):
        config = SRigLConfig(sparsity=0.5, distribution="uniform", delta_t=5, gamma_sal=gamma_sal)
        return SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), config, 100)

    with pytest.warns(UserWarning, match=r"gamma_sal=1e\+09 .* exceeds the dense fan-in of layers \['0', '2'\]"):
        updater(sparsify(_mlp(), UNIFORM), 1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a count a neuron can reach says nothing)
        updater(sparsify(_mlp(), UNIFORM), 3)
