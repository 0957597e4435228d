"""SRigLUpdater: invariants on every layer after every update, gradient plumbing, optimizer state, resume, errors."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import (
    CheckpointError,
    ConfigError,
    LayerError,
    SRigLConfig,
    SRigLUpdater,
    sparse_layers,
    sparsify,
)
from srigl_compile.sparsity import check_constant_fan_in
from srigl_compile.training.optim_state import state_tensors
from tests.models import SmallCNN, make_data
from tests.models import updater_mlp as mlp

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def setup(model_kind="mlp", optimizer="sgd", total=40, **cfg):
    torch.manual_seed(0)
    config = SRigLConfig(**{"sparsity": 0.8, "delta_t": 4, **cfg})
    model = sparsify(mlp() if model_kind == "mlp" else SmallCNN(), config)
    opt = OPTIMIZERS[optimizer](model.parameters())
    return model, opt, SRigLUpdater(model, opt, config, total_steps=total), config


def train_step(model, opt, updater, x, y, micro_batches=1):
    opt.zero_grad(set_to_none=True)
    for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        (F.cross_entropy(model(xb), yb) / micro_batches).backward()
    opt.step()
    return updater.step()


def assert_layer_invariants(model, opt, method, k_expected=None):
    for name, layer in sparse_layers(model):
        mask = layer.neuron_view(layer.mask)
        outside = ~layer.mask
        assert torch.all(layer.weight.detach()[outside] == 0), name
        if layer.weight.grad is not None:
            assert torch.all(layer.weight.grad[outside] == 0), name
        for key, tensor in state_tensors(opt, layer.weight):
            assert torch.all(tensor[outside] == 0), (name, key)
        if method in ("srigl", "static"):
            k, ablated = check_constant_fan_in(mask, layer=name)
            assert k * int((~ablated).sum()) <= layer.srigl_plan.budget, name
            if layer.srigl_plan.protected:
                assert not ablated.any(), name


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(["mlp", "cnn"]),
    st.sampled_from(["srigl", "rigl", "set", "static"]),
    st.sampled_from(list(OPTIMIZERS)),
    st.floats(0.5, 0.95),
    st.sampled_from(["erk", "uniform"]),
    st.integers(1, 3),
    st.sampled_from([0.3, 0.95]),
    st.integers(0, 1000),
)
def test_invariants_hold_on_every_layer_after_every_step(kind, method, optimizer, sparsity, dist, acc_n, gamma, seed):
    model, opt, updater, config = setup(kind, optimizer, total=24, method=method, sparsity=sparsity,
                                        distribution=dist, grad_accumulation_n=acc_n, gamma_sal=gamma, seed=seed)
    x, y = make_data(kind, seed)
    masks_before = {n: l.mask.clone() for n, l in sparse_layers(model)}
    updates = []
    for step in range(1, 25):
        updated = train_step(model, opt, updater, x, y)
        if updated:
            updates.append(step)
        assert_layer_invariants(model, opt, method)
    # t_end = 0.75 * 24 = 18: updates at 4, 8, 12, 16 only; static never updates.
    assert updates == ([] if method == "static" else [4, 8, 12, 16])
    if method == "static":
        assert all(torch.equal(masks_before[n], l.mask) for n, l in sparse_layers(model))


def test_masks_change_and_freeze_after_t_end():
    model, opt, updater, _ = setup(total=40)
    x, y = make_data("mlp", 0)
    history = []
    for _ in range(40):
        train_step(model, opt, updater, x, y)
        history.append({n: l.mask.clone() for n, l in sparse_layers(model)})
    name = next(iter(history[0]))
    assert not torch.equal(history[2][name], history[3][name]), "the update at t=4 changes the mask"
    frozen = history[29:]  # T_end = 30: no update from step 30 on
    assert all(torch.equal(h[n], frozen[0][n]) for h in frozen for n in h)


def test_optimizer_only_ever_sees_masked_gradients():
    model, opt, updater, _ = setup(total=40, grad_accumulation_n=2)
    seen = []

    def check(optimizer, args, kwargs):
        for _, layer in sparse_layers(model):
            seen.append(bool(torch.all(layer.weight.grad[~layer.mask] == 0)))

    opt.register_step_pre_hook(check)
    x, y = make_data("mlp", 1)
    for _ in range(12):
        train_step(model, opt, updater, x, y, micro_batches=2)
    assert seen and all(seen)


def test_dense_gradient_buffer_is_the_mean_over_the_window():
    model, opt, updater, _ = setup(total=40, grad_accumulation_n=3)
    x, y = make_data("mlp", 2)
    name, layer = next(iter(sparse_layers(model)))
    # Steps 1-3 accumulate for the update at 4? No: window is steps 2, 3, 4. Record dense grads by hand.
    dense = []
    for step in range(1, 4):
        opt.zero_grad()
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x), y).backward()
        dense.append(dict(ref.named_parameters())[f"{name}.weight"].grad.clone())
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updater.step()
    assert updater._tap.accumulation_n == 3
    torch.testing.assert_close(updater._tap.buffers[name], (dense[1] + dense[2]) / 3)


def test_grown_weights_start_at_zero_with_zero_optimizer_state():
    model, opt, updater, _ = setup(optimizer="adam", total=40)
    x, y = make_data("mlp", 3)
    for _ in range(3):
        train_step(model, opt, updater, x, y)
    old = {n: l.mask.clone() for n, l in sparse_layers(model)}
    assert train_step(model, opt, updater, x, y)  # t = 4: update
    grown_any = False
    for name, layer in sparse_layers(model):
        grown = layer.mask & ~old[name]
        grown_any |= bool(grown.any())
        assert torch.all(layer.weight.detach()[grown] == 0)
        for _, tensor in state_tensors(opt, layer.weight):
            assert torch.all(tensor[grown] == 0)
    assert grown_any


def test_output_layer_is_never_ablated_even_with_aggressive_ablation():
    model, opt, updater, _ = setup(total=60, gamma_sal=0.95, sparsity=0.95, delta_t=2)
    x, y = make_data("mlp", 4)
    for _ in range(44):
        train_step(model, opt, updater, x, y)
    stats = updater.stats()
    assert stats["layers"]["4"]["ablated_neurons"] == 0
    assert sum(s["ablated_neurons"] for s in stats["layers"].values()) > 0, "gamma 0.95 ablates hidden neurons"


def test_stats_report_every_layer():
    model, opt, updater, _ = setup(total=40)
    x, y = make_data("mlp", 5)
    for _ in range(8):
        train_step(model, opt, updater, x, y)
    stats = updater.stats()
    assert set(stats["layers"]) == {n for n, _ in sparse_layers(model)}
    for name, s in stats["layers"].items():
        assert s["nnz"] == s["k"] * s["active_neurons"] <= s["budget"]
        assert s["active_neurons"] + s["ablated_neurons"] == dict(sparse_layers(model))[name].mask.shape[0]
    g = stats["global"]
    assert 0 < g["density"] <= g["explored_fraction"] <= 1
    assert g["explored_fraction"] > g["density"], "updates explore new weights"


def run(method, steps, resume_at=None, micro_batches=1):
    """Train `steps` steps; with resume_at, checkpoint there and continue in freshly built objects."""
    model, opt, updater, config = setup(total=30, method=method, grad_accumulation_n=3, optimizer="adam")
    data = [make_data("mlp", 100 + i, n=32) for i in range(steps)]
    for i in range(steps):
        if resume_at is not None and i == resume_at:
            state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "upd": updater.state_dict()})
            updater.close()
            model, opt, updater, _ = setup(total=30, method=method, grad_accumulation_n=3, optimizer="adam", seed=99)
            updater.close()
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            updater = SRigLUpdater(model, opt, config, total_steps=30)
            updater.load_state_dict(state["upd"])
        train_step(model, opt, updater, *data[i], micro_batches=micro_batches)
    return model


@pytest.mark.parametrize("method", ["srigl", "set"])
def test_resume_is_bit_exact_even_mid_gradient_window(method):
    uninterrupted = run(method, 14)
    resumed = run(method, 14, resume_at=7)  # steps 6-8 accumulate for the update at 8: resume inside the window
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_updater_needs_a_sparsified_model():
    with pytest.raises(LayerError, match="sparsify"):
        SRigLUpdater(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), SRigLConfig(), 10)


def test_optimizer_must_be_an_optimizer():
    model, _, _, config = setup()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SRigLUpdater(model, None, config, total_steps=10)


def test_optimizer_must_hold_the_sparse_weights():
    original = mlp()
    model = sparsify(original, SRigLConfig())
    with pytest.raises(ConfigError, match="optimizer"):
        SRigLUpdater(model, torch.optim.SGD(original.parameters(), lr=0.1), SRigLConfig(), 10)


@pytest.mark.parametrize("total", [0, -5, 2.5, True])
def test_total_steps_must_be_positive(total):
    model = sparsify(mlp(), SRigLConfig())
    with pytest.raises(ConfigError, match="total_steps"):
        SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), SRigLConfig(), total)


def test_checkpoint_without_masks_or_for_another_model_is_rejected():
    model, opt, updater, config = setup()
    with pytest.raises(CheckpointError, match="no masks"):
        updater.load_state_dict({"step": 3})
    with pytest.raises(CheckpointError, match="no masks"):
        updater.load_state_dict(model.state_dict())  # a model state dict is not an updater checkpoint
    other, other_opt, other_updater, _ = setup("cnn")
    with pytest.raises(CheckpointError, match="another model"):
        updater.load_state_dict(other_updater.state_dict())
    state = updater.state_dict()
    state["masks"]["0"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(CheckpointError, match="does not match"):
        updater.load_state_dict(state)
    wider = SRigLUpdater(model, opt, config.replace(delta_t=5), 40)
    with pytest.raises(CheckpointError, match="delta_t"):
        wider.load_state_dict(updater.state_dict())


@pytest.mark.parametrize("field", ["step", "generator", "explored", "grad_buffers", "config", "plans"])
def test_a_checkpoint_missing_a_field_is_rejected_before_anything_changes(field):
    model, opt, updater, _ = setup()
    x, y = make_data("mlp", 0)
    for _ in range(5):
        train_step(model, opt, updater, x, y)
    state = updater.state_dict()
    del state[field]
    fresh_model, fresh_opt, fresh, _ = setup()
    before = copy.deepcopy(fresh_model.state_dict())
    with pytest.raises(CheckpointError, match=field):
        fresh.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in fresh_model.state_dict().items())
    assert fresh.step_count == 0


def test_a_checkpoint_from_another_sparsity_or_with_a_corrupt_mask_is_rejected():
    """Same layers, other sparsity: the plans (budget, k) differ, and resuming would quietly train at the
    updater's sparsity from the next update on."""
    _, _, denser_run, _ = setup(sparsity=0.6, distribution="uniform")
    model, opt, updater, _ = setup(sparsity=0.9, distribution="uniform")
    with pytest.raises(CheckpointError, match="another sparsity"):
        updater.load_state_dict(denser_run.state_dict())
    state = updater.state_dict()
    state["masks"]["0"] = torch.ones_like(state["masks"]["0"])
    with pytest.raises(CheckpointError, match="budget"):
        updater.load_state_dict(state)


def test_missing_backward_before_an_update_is_a_clear_error():
    from srigl_compile import InvariantError

    model, opt, updater, _ = setup()
    for _ in range(3):
        updater.step()
    with pytest.raises(InvariantError, match="backward"):
        updater.step()


@pytest.mark.parametrize("method", ["srigl", "set", "static"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_stops_the_update_naming_the_layer(method, value):
    """Found by probing: an inf weight passed a SET update and check_invariants, and a NaN's error named no
    layer. (Static masks have no update: check_invariants still finds it.)"""
    from srigl_compile import InvariantError

    model, opt, updater, _ = setup(method=method)
    x, y = make_data("mlp", 0)
    for _ in range(3):
        train_step(model, opt, updater, x, y)
    name, layer = list(sparse_layers(model))[1]
    row, column = layer.mask.nonzero()[0].tolist()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        layer.weight[row, column] = value  # (after the backward: the recorded gradients stay finite)
    if method == "static":
        assert not updater.step()  # (no update, nothing checked)
        with pytest.raises(InvariantError, match=f"layer {name!r} has non-finite weights .* at an invariant check"):
            updater.check_invariants()
    else:
        with pytest.raises(InvariantError, match=f"layer {name!r} has non-finite weights .* at a mask update"):
            updater.step()


def test_channels_last_cnn_trains_with_masks_kept_in_place():
    """Channels-last inputs (and a channels_last model) give channels_last weight gradients: the update must read
    and write them, the weights and the masks in whatever layout they have."""
    model, opt, updater, _ = setup("cnn", "adam", total=20)
    model.to(memory_format=torch.channels_last)
    x, y = make_data("cnn", 0)
    x = x.to(memory_format=torch.channels_last)
    before = {n: layer.mask.clone() for n, layer in sparse_layers(model)}
    updates = sum(train_step(model, opt, updater, x, y) for _ in range(12))
    assert updates == 3
    assert not model.conv1.weight.is_contiguous()  # still channels_last, updated in place
    assert any(not torch.equal(before[n], layer.mask) for n, layer in sparse_layers(model))
    assert_layer_invariants(model, opt, "srigl")


class WithUnusedHead(nn.Module):
    """A second head the loss ignores (like a Hugging Face pooler): it runs, but gets no gradient."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.pooler = nn.Linear(20, 32), nn.Linear(32, 5), nn.Linear(32, 32)

    def forward(self, x):
        h = self.body(x).relu()
        return self.head(h), self.pooler(h)


def test_a_layer_outside_the_loss_keeps_its_mask_with_a_warning():
    config = SRigLConfig(sparsity=0.8, delta_t=2)
    model = sparsify(WithUnusedHead(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigLUpdater(model, opt, config, total_steps=20)
    x, y = make_data("mlp", 0)
    pooler_mask, body_mask = model.pooler.mask.clone(), model.body.mask.clone()
    with pytest.warns(UserWarning, match=r"\['pooler'\] got no gradient"):
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x)[0], y).backward()
            opt.step()
            updater.step()
    assert torch.equal(model.pooler.mask, pooler_mask)
    assert not torch.equal(model.body.mask, body_mask)
    assert_layer_invariants(model, opt, "srigl")


def test_optimizer_sees_exactly_the_masked_dense_gradient_inside_the_window():
    model, opt, updater, _ = setup(total=40, grad_accumulation_n=3)
    x, y = make_data("mlp", 6)
    for step in range(1, 5):  # steps 2-4 are inside the window of the update at 4
        opt.zero_grad()
        reference = copy.deepcopy(model)
        F.cross_entropy(reference(x), y).backward()
        F.cross_entropy(model(x), y).backward()
        for (name, layer), (_, ref_layer) in zip(sparse_layers(model), sparse_layers(reference)):
            torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad * layer.mask, rtol=0, atol=0)
        opt.step()
        updater.step()
