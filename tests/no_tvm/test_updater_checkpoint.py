"""SRigLUpdater.load_state_dict validates every field before it changes anything.

Each test corrupts one field of a real ``updater.state_dict()`` (saved inside a gradient window, after a mask
update), loads it into another updater of the same run, and checks the CheckpointError names the field and that
the updater (masks, weights, step, generator, buffers, explored bits) is exactly as it was.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import CheckpointError, SRigLConfig, SRigLUpdater, sparsify
from srigl_compile.sparsity import random_fan_in_mask

TOTAL = 40
OUTPUT = "4"  # the last Linear: protected, never ablated


def build(method="srigl", **cfg):
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4, grad_accumulation_n=3, method=method, **cfg)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    model = sparsify(net, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, SRigLUpdater(model, opt, config, total_steps=TOTAL), opt


def saved_state(method="srigl"):
    """A state after 7 steps: one mask update at 4 and (SRigL, RigL) the gradient buffers of the window before the
    update at 8."""
    model, updater, opt = build(method)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updater.step()
    state = updater.state_dict()
    assert state["grad_buffers"] or method in ("static", "set"), "saved mid-window"
    updater.close()
    return state


@pytest.fixture(scope="module")
def state():
    return saved_state()


def snapshot(model, updater):
    return copy.deepcopy({"model": model.state_dict(), "step": updater.step_count,
                          "generator": updater.generator.get_state(), "buffers": dict(updater._tap.buffers),
                          "explored": updater.explored})


def assert_unchanged(before, after):
    for key in ("model", "buffers", "explored"):
        assert before[key].keys() == after[key].keys(), key
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), (key, name)
    assert before["step"] == after["step"]
    assert torch.equal(before["generator"], after["generator"])


def assert_refused(state, field, match, method="srigl"):
    model, updater, _ = build(method)
    torch.rand(3, generator=updater.generator)  # so that a restored generator would show
    before = snapshot(model, updater)
    with pytest.raises(CheckpointError, match=match) as info:
        updater.load_state_dict(state)
    assert repr(field) in str(info.value)
    assert_unchanged(before, snapshot(model, updater))


def neuron_view(mask):
    return mask.reshape(mask.shape[0], -1)


def one_fewer_per_neuron(mask):
    """Every active neuron drops one input: k - 1 each, under the budget."""
    view = neuron_view(mask).clone()
    rows = torch.arange(view.shape[0])
    first = view.int().argmax(dim=1)
    active = view.any(dim=1)
    view[rows[active], first[active]] = False
    return view.view(mask.shape)


def with_mask(state, layer, mask):
    bad = copy.deepcopy(state)
    bad["masks"][layer] = mask
    return bad


@pytest.mark.parametrize("value, match", [
    (torch.zeros(10, dtype=torch.uint8), "not a torch.Generator state"),
    ("seed 0", "not a torch.Generator state"),
], ids=["short", "not-a-tensor"])
def test_a_bad_generator_state_is_refused_before_masks_or_step_change(state, value, match):
    assert_refused({**state, "generator": value}, "generator", match)


@pytest.mark.parametrize("skips", [-1, 99, 1.0, True])
def test_window_skips_must_be_an_int_within_the_window(state, skips):
    assert_refused({**state, "window_skips": skips}, "window_skips", r"int in \[0, grad_accumulation_n=")


@pytest.mark.parametrize("step", [-7, 3.0, True, "7"])
def test_step_must_be_a_non_negative_int(state, step):
    assert_refused({**state, "step": step}, "step", r"int >= 0")


@pytest.mark.parametrize("field", ["masks", "grad_buffers", "explored"])
def test_tensors_on_the_meta_device_are_refused_naming_map_location(state, field):
    bad = copy.deepcopy(state)
    bad[field] = {name: t.to("meta") for name, t in bad[field].items()}
    assert_refused(bad, field, "meta device.*map_location='cpu'")


def test_steps_past_total_steps_warn_once_keep_the_masks_and_resume_bit_exact():
    """A loop a few steps longer than total_steps must not stop training, nor leave a checkpoint that cannot load."""
    model, updater, opt = build()
    g = torch.Generator().manual_seed(2)
    for step in range(1, TOTAL + 4):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        masks = {n: m.clone() for n, m in updater._masks().items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            updated = updater.step()
        assert not (updated and step > TOTAL)
        past = [w for w in caught if "past total_steps=40" in str(w.message)]
        assert len(past) == (step == TOTAL + 1), step
        assert all(w.filename == __file__ for w in past)  # (the caller's line, not torch's no_grad wrapper)
        if step > TOTAL:
            assert all(torch.equal(masks[n], m) for n, m in updater._masks().items())
    state = updater.state_dict()
    assert state["step"] == TOTAL + 3
    _, resumed, _ = build()
    resumed.load_state_dict(state)
    assert resumed.step_count == TOTAL + 3
    assert all(torch.equal(resumed._masks()[n], m) for n, m in updater._masks().items())


def test_masks_must_be_bool(state):
    assert_refused(with_mask(state, "0", state["masks"]["0"].float()), "masks", "bool tensor")


@pytest.mark.parametrize("layer, match", [(OUTPUT, "output layer's .protected. mask is empty"), ("2", "empty")])
def test_an_empty_mask_is_refused(state, layer, match):
    assert_refused(with_mask(state, layer, torch.zeros_like(state["masks"][layer])), "masks", match)


@pytest.mark.parametrize("layer", ["0", OUTPUT])
def test_every_neuron_at_k_minus_1_is_under_budget_and_refused(state, layer):
    mask = one_fewer_per_neuron(state["masks"][layer])
    assert_refused(with_mask(state, layer, mask), "masks", "budget // active")


def test_a_mask_that_is_not_constant_fan_in_is_refused(state):
    mask = neuron_view(state["masks"]["2"]).clone()
    mask[0] = one_fewer_per_neuron(mask)[0]
    assert_refused(with_mask(state, "2", mask), "masks", "not constant fan-in")


def test_the_output_layer_never_has_ablated_neurons(state):
    mask = state["masks"][OUTPUT].clone()
    mask[1] = False
    assert_refused(with_mask(state, OUTPUT, mask), "masks", r"protected \(output\) layer never ablates")


def test_ablated_neurons_are_refused_where_ablation_is_off():
    state = saved_state("static")
    mask = state["masks"]["0"].clone()
    mask[3] = False
    assert_refused(with_mask(state, "0", mask), "masks", "static without ablation", method="static")


def test_a_rigl_mask_must_keep_its_non_zero_count():
    state = saved_state("rigl")
    mask = state["masks"]["2"].clone()
    mask.view(-1)[mask.view(-1).nonzero()[0]] = False
    assert_refused(with_mask(state, "2", mask), "masks", r"holds 127 non-zeros; rigl keeps the number the run started "
                                                         r"with, 128 \(sparsify's n_out x k0 = 32 x 4", method="rigl")


@pytest.mark.parametrize("change, match", [
    (lambda b: b.__setitem__("0", b["0"][:, :5].clone()), r"float32 of the weight's shape \(32, 20\)"),
    (lambda b: b.__setitem__("0", b["0"].double()), "float64"),
    (lambda b: b.__setitem__("nope", torch.zeros(3)), "not a sparse layer"),
], ids=["shape", "dtype", "unknown-layer"])
def test_gradient_buffers_must_be_float32_weight_shaped_and_of_known_layers(state, change, match):
    bad = copy.deepcopy(state)
    bad["grad_buffers"].setdefault("0", torch.zeros(32, 20))
    change(bad["grad_buffers"])
    assert_refused(bad, "grad_buffers", match)


@pytest.mark.parametrize("change, match", [
    (lambda e: e.pop("2"), "covers layers"),
    (lambda e: e.__setitem__("2", e["2"][:-1].clone()), r"uint8 of shape \(128,\)"),
    (lambda e: e.__setitem__("2", e["2"].int()), "int32"),
    (lambda e: e.__setitem__("2", torch.zeros_like(e["2"])), "misses weights active in the mask"),
], ids=["missing-layer", "truncated", "dtype", "does-not-cover-the-mask"])
def test_explored_bits_cover_every_layer_at_the_right_length(state, change, match):
    bad = copy.deepcopy(state)
    change(bad["explored"])
    assert_refused(bad, "explored", match)


@pytest.mark.parametrize("field, value, match", [
    ("config", {"sparsity": 2.0}, "not an SRigLConfig"),
    ("masks", [1, 2], "must map layer names"),
    ("explored", None, "must map layer names"),
])
def test_malformed_containers_are_refused(state, field, value, match):
    assert_refused({**state, field: value}, field, match)


def test_a_valid_state_round_trips_and_a_valid_ablated_mask_loads(state):
    model, updater, _ = build()
    updater.load_state_dict(state)
    again = updater.state_dict()
    assert again.keys() == state.keys()
    for field in ("masks", "grad_buffers", "explored"):
        assert again[field].keys() == state[field].keys()
        assert all(torch.equal(again[field][n], t) for n, t in state[field].items()), field
    assert again["step"] == state["step"] and torch.equal(again["generator"], state["generator"])
    # SRigL may ablate hidden neurons: the survivors then hold k = budget // active each.
    plan = dict(model.named_modules())["0"].srigl_plan
    k = plan.budget // (plan.n_out - 2)
    mask = random_fan_in_mask(plan.n_out, plan.fan_in, k, torch.Generator().manual_seed(0))
    mask[[5, 9]] = False
    ablated = with_mask(state, "0", mask)
    ablated["explored"]["0"] = torch.full_like(state["explored"]["0"], 255)
    updater.load_state_dict(ablated)
    assert torch.equal(dict(model.named_modules())["0"].mask, mask)


_CHANGED = {"method": "rigl", "ablation": False, "gamma_sal": 0.5, "alpha": 0.2, "delta_t": 5, "t_end_fraction": 0.5,
            "grad_accumulation_n": 2, "seed": 7}


@pytest.mark.parametrize("field", sorted(_CHANGED))
def test_a_checkpoint_made_with_another_training_setting_is_refused_naming_it(state, field):
    """A mutation probe dropped gamma_sal from the settings a resume must share, and every test passed: only
    delta_t was tried."""
    edited = {**state, "config": {**state["config"], field: _CHANGED[field]}}
    assert edited["config"][field] != state["config"][field]
    model, updater, _ = build()
    before = snapshot(model, updater)
    with pytest.raises(CheckpointError, match=rf"other training settings \(\['{field}'\]\)"):
        updater.load_state_dict(edited)
    assert_unchanged(before, snapshot(model, updater))


def test_a_checkpoint_from_a_run_of_another_length_is_refused():
    """T_end is a fraction of total_steps: resuming into a longer run would move every later update."""
    model, updater, _ = build()
    updater.close()
    longer = SRigLUpdater(model, updater.optimizer, updater.config, total_steps=2 * TOTAL)
    with pytest.raises(CheckpointError, match="total_steps"):
        longer.load_state_dict(saved_state())


@pytest.mark.parametrize("field", ["n_out", "fan_in", "budget", "k0", "protected"])
def test_a_plan_field_differing_alone_is_refused(state, field):
    """A mutation probe stopped comparing budgets and every test passed: the one test changed k0 with it."""
    plan = state["plans"]["0"]
    edited = {**state, "plans": {**state["plans"], "0": {**plan, field: (not plan[field]) if field == "protected"
                                                          else plan[field] + 1}}}
    assert_refused(edited, field, rf"layer '0': the checkpoint's plan differs in \['{field}'\]")
