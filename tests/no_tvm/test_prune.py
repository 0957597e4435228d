"""One-shot pruning (magnitude, Wanda) and importing already-pruned weights: exact per-row top-k, weights kept,
Wanda's rule against a reference, calibration norms against unfold, imports, typed errors, fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import (
    ConfigError,
    LayerError,
    SRigLConfig,
    SRigLUpdater,
    from_sparse_weights,
    prune,
    sparse_layers,
)
from srigl_compile.passes.calibration import collect_input_norms
from srigl_compile.passes.discover import capture_graph, discover_layers
from srigl_compile.sparsity import check_constant_fan_in
from srigl_compile.sparsity.pruning import magnitude_scores, prune_to_fan_in, wanda_scores
from tests.models import SmallCNN, make_data, zeroed
from tests.models import prune_mlp as mlp

UNIFORM_90 = SRigLConfig(sparsity=0.9, distribution="uniform")


# -- the maths ---------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(2, 30), st.data(), st.booleans())
def test_each_row_keeps_exactly_its_k_highest_scores(n_out, fan_in, data, wanda):
    k0 = data.draw(st.integers(1, fan_in))
    seed = data.draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, fan_in, generator=g)
    scores = wanda_scores(weight, torch.rand(fan_in, generator=g) + 0.01) if wanda else magnitude_scores(weight)
    result = prune_to_fan_in(scores, budget=k0 * n_out, k0=k0, ablation=False, gamma_sal=0.3)
    assert result.mask.sum(dim=1).tolist() == [k0] * n_out and result.k == k0 and not result.ablated.any()
    for row in range(n_out):
        kept, dropped = scores[row][result.mask[row]], scores[row][~result.mask[row]]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12), st.integers(2, 30), st.floats(0.05, 0.9), st.integers(0, 2 ** 16))
def test_ablation_hands_the_budget_to_survivors_within_it(n_out, fan_in, density, seed):
    budget = max(n_out, int(n_out * fan_in * density))
    weight = torch.randn(n_out, fan_in, generator=torch.Generator().manual_seed(seed))
    weight[0] *= 1e-4  # a neuron whose weights hardly matter
    result = prune_to_fan_in(magnitude_scores(weight), budget=budget, k0=budget // n_out, ablation=True,
                             gamma_sal=0.3)
    k, ablated = check_constant_fan_in(result.mask)
    assert torch.equal(ablated, result.ablated) and k == result.k
    assert k == budget // (n_out - int(ablated.sum())) and k * (n_out - int(ablated.sum())) <= budget


# -- prune() on models -------------------------------------------------------------------------------------------
def wanda_reference_masks(model: nn.Sequential, x: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda's rule as its reference code states it: metric |W| * sqrt(mean of x_j^2), sort each output row, zero
    the int(fan_in * sparsity) lowest. Inputs of each Linear computed by running the Sequential by hand."""
    masks, h = {}, x
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            scaler = h.pow(2).sum(dim=0) / h.shape[0]
            metric = module.weight.detach().abs() * scaler.sqrt()
            order = torch.sort(metric, dim=-1, stable=True).indices
            mask = torch.ones_like(metric, dtype=torch.bool)
            mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], False)
            masks[name] = mask
        h = module(h)
    return masks


def test_wanda_masks_equal_the_reference_rule_and_weights_are_kept():
    # fan-ins 40, 50, 80: Wanda zeroes int(0.9 x fan-in) a row, the same count as our budget floor(0.1 x N)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 80), nn.ReLU(), nn.Linear(80, 10))
    x = torch.randn(256, 40)
    config = SRigLConfig(sparsity=0.9, distribution="uniform", keep_last_dense=False)
    pruned = prune(net, config, "wanda", calibration=[x[:100], x[100:]])
    reference = wanda_reference_masks(net, x, 0.9)
    layers = dict(sparse_layers(pruned))
    assert layers.keys() == reference.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.mask, reference[name]), name
        original = net.get_submodule(name).weight
        assert torch.equal(layer.weight[layer.mask], original[layer.mask])  # kept as trained, not redrawn
        assert not layer.weight[~layer.mask].any()
    magnitude = prune(net, config, "magnitude")
    assert any(not torch.equal(layer.mask, layers[name].mask) for name, layer in sparse_layers(magnitude))


def test_prune_plans_densities_as_sparsify_does_and_protects_the_output_layer():
    net = mlp()
    pruned = prune(net, SRigLConfig(sparsity=0.9), "magnitude", ablation=True)
    for name, layer in sparse_layers(pruned):
        plan = layer.srigl_plan
        k, ablated = check_constant_fan_in(layer.neuron_view(layer.mask), layer=name)
        assert k * int((~ablated).sum()) <= plan.budget
        if plan.protected:
            assert not ablated.any()
    assert dict(sparse_layers(pruned))["4"].srigl_plan.protected


def test_ablation_at_prune_time_drops_neurons_whose_weights_are_negligible():
    net = mlp()
    with torch.no_grad():
        net[2].weight[:20] *= 1e-3  # 20 of 80 neurons of the hidden layer hardly matter
    pruned = prune(net, UNIFORM_90, "magnitude", ablation=True)
    _, ablated = check_constant_fan_in(pruned[2].neuron_view(pruned[2].mask))
    assert ablated[:20].all() and not ablated[20:].any()
    assert not prune(net, UNIFORM_90, "magnitude")[2].mask.sum(dim=1).eq(0).any()  # off by default


def test_a_pruned_model_fine_tunes_with_moving_or_fixed_masks():
    x, y = make_data("cnn", 0)
    torch.manual_seed(0)
    net = SmallCNN()
    for method in ("srigl", "static"):
        config = SRigLConfig(sparsity=0.8, distribution="uniform", delta_t=2, method=method)
        model = prune(net, config, "wanda", calibration=[x])
        before = {name: layer.mask.clone() for name, layer in sparse_layers(model)}
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        updater = SRigLUpdater(model, opt, config, total_steps=10)
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            updater.step()
        updater.check_invariants()
        moved = any(not torch.equal(before[name], layer.mask) for name, layer in sparse_layers(model))
        assert moved == (method == "srigl")


def test_the_reference_loop_fine_tunes_a_pruned_model_with_its_masks():
    from srigl_compile.data import teacher_student
    from srigl_compile.recipes import train_classifier
    from srigl_compile.zoo import build_model

    data = teacher_student(n_train=256, n_test=64, seed=1)
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.9, delta_t=2, method="static")
    pruned = prune(build_model("mlp", data.input_shape, data.num_classes), config, "magnitude")
    before = {name: layer.mask.clone() for name, layer in sparse_layers(pruned)}
    result = train_classifier(pruned, data, config, epochs=1)
    assert result.model is pruned  # trained as it is, not sparsified again
    assert all(torch.equal(before[name], layer.mask) for name, layer in sparse_layers(pruned))


def test_batchnorm_statistics_recalibrated_after_pruning_are_those_of_the_pruned_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
    pruned = prune(net, UNIFORM_90, "magnitude", calibration=[x[:8], x[8:]], recalibrate_batchnorm=True)
    halves = [pruned[0](half).detach() for half in (x[:8], x[8:])]  # the cumulative average over the 2 batches
    torch.testing.assert_close(pruned[1].running_mean, sum(h.mean(dim=(0, 2, 3)) for h in halves) / 2)
    torch.testing.assert_close(pruned[1].running_var, sum(h.var(dim=(0, 2, 3)) for h in halves) / 2)
    assert pruned[1].momentum == net[1].momentum and pruned.training == net.training
    assert net[1].running_mean.eq(5.0).all()  # the original model is untouched
    with pytest.raises(ConfigError, match="recalibrate_batchnorm=True needs calibration"):
        prune(net, UNIFORM_90, "magnitude", recalibrate_batchnorm=True)
    with pytest.warns(UserWarning, match="no BatchNorm keeping running statistics: nothing was recalibrated"):
        prune(mlp(), UNIFORM_90, "magnitude", calibration=[torch.randn(4, 40)], recalibrate_batchnorm=True)


# -- calibration norms -------------------------------------------------------------------------------------------
def unfold_norms(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The reference: im2col columns of each group, their L2 norm over batch x positions."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    per_group = cols.reshape(x.shape[0], conv.groups, -1, cols.shape[-1])
    norms = per_group.pow(2).sum(dim=(0, 3)).sqrt()
    return norms.repeat_interleave(conv.out_channels // conv.groups, dim=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 4, (3, 2), stride=2, dilation=(1, 2), groups=2),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4),
], ids=["plain", "strided-dilated-grouped", "reflect-depthwise"])
def test_conv_input_norms_equal_the_unfolded_columns(conv):
    model, x = nn.Sequential(conv), torch.randn(3, conv.in_channels, 9, 10)
    candidates = discover_layers(model, capture_graph(model, None), None)
    norms = collect_input_norms(model, candidates, [x[:2], x[2:]])["0"]
    torch.testing.assert_close(norms, unfold_norms(conv, x), rtol=1e-5, atol=1e-5)


def test_conv1d_and_attention_input_norms():
    conv = nn.Conv1d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 11)
    model = nn.Sequential(conv)
    norms = collect_input_norms(model, discover_layers(model, capture_graph(model, None), None), [x])["0"]
    reference = unfold_norms(nn.Conv2d(3, 5, (1, 3), padding=(0, 1)), x.unsqueeze(2))
    torch.testing.assert_close(norms, reference, rtol=1e-5, atol=1e-5)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, q, kv):
            return self.mha(q, kv, kv * 2)[0]

    model, q, kv = Attend(), torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    candidates = discover_layers(model, capture_graph(model, (q, kv)), None)
    norms = collect_input_norms(model, candidates, [(q, kv)])["mha.in_proj"]
    expected = torch.cat([q.reshape(-1, 8).norm(dim=0).expand(8, 8), kv.reshape(-1, 8).norm(dim=0).expand(8, 8),
                          (kv * 2).reshape(-1, 8).norm(dim=0).expand(8, 8)])
    torch.testing.assert_close(norms, expected)


def test_weights_pruned_to_constant_fan_in_import_without_changing_a_weight():
    net = zeroed(mlp(), {"0": 4, "2": 6})
    with torch.no_grad():
        net[2].weight[5] = 0  # an ablated neuron
    imported = from_sparse_weights(net)
    layers = dict(sparse_layers(imported))
    assert layers.keys() == {"0", "2"}  # the output layer has no zeros: it stays dense
    for name, layer in layers.items():
        assert torch.equal(layer.mask, net.get_submodule(name).weight != 0)
        assert torch.equal(layer.weight, net.get_submodule(name).weight)
    assert layers["2"].srigl_plan.budget == 6 * 79 and layers["0"].srigl_plan.k0 == 4
    x = torch.randn(5, 40)
    torch.testing.assert_close(imported(x), net(x), rtol=0, atol=0)
    # and it trains with SRigL like a sparsified model
    opt = torch.optim.SGD(imported.parameters(), lr=0.01)
    updater = SRigLUpdater(imported, opt, SRigLConfig(delta_t=1), total_steps=4)
    F.cross_entropy(imported(x), torch.arange(5)).backward()
    opt.step()
    assert updater.step()


def test_unequal_rows_are_an_error_naming_the_layer_unless_rebalanced():
    net = zeroed(mlp(), {"0": 4, "2": 6})
    with torch.no_grad():
        net[2].weight[3, :12] = 1.0  # row 3 of layer 2 holds more
    extra = int((net[2].weight[3] != 0).sum()) - 6
    with pytest.raises(LayerError, match=rf"layer '2'.*rebalance=True.*dropping {extra} of"):
        from_sparse_weights(net)
    with pytest.warns(UserWarning, match=rf"'2': {extra}"):
        imported = from_sparse_weights(net, rebalance=True)
    row = imported[2].weight[3]
    assert int((row != 0).sum()) == 6 and set(row[row != 0].tolist()) == {1.0}  # its 6 largest kept


def test_import_errors():
    with pytest.raises(LayerError, match="no layer of the model has zero weights"):
        from_sparse_weights(mlp())
    net = zeroed(mlp(), {"4": 8})
    with torch.no_grad():
        net[4].weight[2] = 0
    with pytest.raises(LayerError, match="output layer '4' has rows of zeros"):
        from_sparse_weights(net)


# -- errors ------------------------------------------------------------------------------------------------------
def test_bad_input_is_a_typed_error_before_the_model_changes():
    net = mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="criterion='wanda' needs calibration"):
        prune(net, UNIFORM_90, "wanda")
    with pytest.raises(ConfigError, match="calibration input #1 does not fit the model") as info:
        prune(net, UNIFORM_90, "wanda", calibration=[torch.randn(4, 7)], inplace=True)
    assert "labels" not in str(info.value)
    labelled = [(torch.randn(4, 40), torch.randint(0, 10, (4,)))]  # (a DataLoader's (x, y) batches)
    with pytest.raises(ConfigError, match=r"#1 does not fit .* give the inputs alone, e.g. \[x for x, _ in loader\]"):
        prune(net, UNIFORM_90, "wanda", calibration=labelled, inplace=True)
    with pytest.raises(ConfigError, match="calibration is empty"):
        prune(net, UNIFORM_90, "wanda", calibration=[])
    with pytest.raises(ConfigError, match="criterion='snip'"):
        prune(net, UNIFORM_90, "snip")
    with pytest.raises(LayerError, match="constant fan-in k would be 0"):
        prune(net, SRigLConfig(sparsity=0.999, distribution="uniform"), "magnitude")
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(LayerError, match="layer '2' has NaN or inf weights"):
        prune(net, UNIFORM_90, "magnitude", inplace=True)
    assert not any(True for _ in sparse_layers(net))
    assert all(torch.equal(v, before[k]) or k == "2.weight" for k, v in net.state_dict().items())


# -- what probes found -------------------------------------------------------------------------------------------
class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(40, 30), nn.Linear(30, 10)

    def forward(self, x, scale):
        return self.out(torch.relu(self.fc(x * scale)))


def test_a_tuple_or_mapping_of_calibration_inputs_is_one_call():
    """A top-level tuple was split into calls of one input each (other masks, no error); a tokenizer's
    BatchEncoding (a Mapping, not a dict) was refused."""
    from collections import UserDict

    torch.manual_seed(0)
    net, x, scale = _Scaled(), torch.randn(16, 40), torch.rand(16, 40) * 4
    config = SRigLConfig(sparsity=0.8, distribution="uniform", keep_last_dense=False)
    masks = lambda m: {n: layer.mask for n, layer in sparse_layers(m)}  # noqa: E731
    want = masks(prune(net, config, "wanda", calibration=[(x, scale)]))
    for calibration in ((x, scale), UserDict(x=x, scale=scale), [UserDict(x=x, scale=scale)]):
        got = masks(prune(net, config, "wanda", calibration=calibration))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), type(calibration)


def test_calibration_and_batchnorm_statistics_keep_each_module_s_mode():
    """Fine-tuning with frozen BatchNorms: the model trains, its BatchNorm and Dropout stay in eval mode; Wanda's
    and the recalibration's forwards set every module to the model's flag afterwards."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 36, 5)).train()
    net[1].eval()
    net[3].eval()
    x = torch.randn(8, 3, 6, 6)
    for criterion, recalibrate in (("wanda", False), ("magnitude", True)):
        pruned = prune(net, UNIFORM_90, criterion, calibration=[x], recalibrate_batchnorm=recalibrate)
        assert [m.training for m in pruned.modules()] == [m.training for m in net.modules()], criterion


def test_from_sparse_weights_protects_no_ablation_layers_and_checks_its_flag():
    """from_sparse_weights left config.no_ablation's layers unprotected (the updater then ablated them) and took
    any truthy rebalance."""
    net = zeroed(mlp(), {"0": 4, "2": 6})
    config = SRigLConfig(no_ablation=("0",))
    plans = {name: layer.srigl_plan for name, layer in sparse_layers(from_sparse_weights(net, config))}
    assert plans["0"].protected and not plans["2"].protected
    with pytest.raises(ConfigError, match="no_ablation entry 'missing' matches no sparsifiable layer"):
        from_sparse_weights(net, SRigLConfig(no_ablation=("missing",)))
    with torch.no_grad():
        net[0].weight[3] = 0  # (an ablated neuron where none may be)
    with pytest.raises(LayerError, match=r"layer '0' \(SRigLConfig.no_ablation\) has rows of zeros \[3\]"):
        from_sparse_weights(net, config)
    with pytest.raises(ConfigError, match="rebalance='no' must be True or False"):
        from_sparse_weights(net, rebalance="no")


def test_wanda_calibrates_torch_s_encoder_through_its_nested_tensor_path():
    """With a padding mask in eval mode, torch's TransformerEncoder runs its layers on nested tensors, which the
    calibration hook reshaped (an error blaming the input); the norms are the valid tokens'."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2).eval()
    x, pad = torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    inputs = {"src": x, "src_key_padding_mask": pad}
    with pytest.warns(UserWarning, match="never called layers"):  # (out_proj: read, not called)
        pruned = prune(encoder, SRigLConfig(sparsity=0.8, distribution="uniform"), "wanda", calibration=[inputs],
                       example_inputs=inputs)
    assert any(name.endswith("linear1") for name, _ in sparse_layers(pruned))
