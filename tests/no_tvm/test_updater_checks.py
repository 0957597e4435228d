"""What the updater checks and computes, on each layer, as a mutation probe found the suite did not pin down:
every layer's invariants (not the first or last only), the schedule as the updater uses it, ablation switched off."""

import math

import pytest
import torch
import torch.nn.functional as F

from srigl_compile import InvariantError, LayerError, SRigLConfig, SRigLUpdater, condense, sparse_layers, sparsify
from tests.models import make_data
from tests.models import updater_mlp as mlp


def trained(steps=5, total=40, **cfg):
    """An MLP at 80% after ``steps`` SGD steps with momentum (one mask update at 4)."""
    torch.manual_seed(0)
    config = SRigLConfig(**{"sparsity": 0.8, "delta_t": 4, **cfg})
    model = sparsify(mlp(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    updater = SRigLUpdater(model, opt, config, total_steps=total)
    x, y = make_data("mlp", 0)
    updates = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if updater.step():
            updates.append(t)
    return model, opt, updater, updates


def outside(layer):
    """A position outside the layer's mask."""
    return tuple((~layer.mask).nonzero()[0].tolist())


@pytest.mark.parametrize("index", [0, 1, -1])
def test_a_weight_outside_the_mask_of_any_layer_is_an_invariant_error_naming_it(index):
    model, _, updater, _ = trained()
    name, layer = list(sparse_layers(model))[index]
    with torch.no_grad():
        layer.weight[outside(layer)] = 1e-6  # (however small: condense would drop it and change the outputs)
    with pytest.raises(InvariantError, match=rf"{name}.*outside the mask"):
        updater.check_invariants()


def test_a_gradient_or_optimizer_state_outside_the_mask_is_an_invariant_error():
    model, opt, updater, _ = trained()
    _, layer = list(sparse_layers(model))[0]
    x, y = make_data("mlp", 0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layer.weight.grad[outside(layer)] = 0.25
    with pytest.raises(InvariantError, match="gradients outside the mask"):
        updater.check_invariants()
    layer.weight.grad[outside(layer)] = 0
    opt.state[layer.weight]["momentum_buffer"][outside(layer)] = 1e-6
    with pytest.raises(InvariantError, match="momentum_buffer"):
        updater.check_invariants()


def test_an_ablated_neuron_in_the_protected_output_layer_is_an_invariant_error():
    model, opt, updater, _ = trained()
    _, layer = next((n, m) for n, m in sparse_layers(model) if m.srigl_plan.protected)
    with torch.no_grad():  # (emptied cleanly: weight, gradient and state zero, so only the ablation is wrong)
        layer.mask[0], layer.weight[0] = False, 0
        if layer.weight.grad is not None:
            layer.weight.grad[0] = 0
        for value in opt.state[layer.weight].values():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                value[0] = 0
    with pytest.raises(InvariantError, match="protected"):
        updater.check_invariants()


def test_t_end_is_the_floor_of_the_fraction_of_total_steps():
    """int(0.75 x 27) = 20 as in the reference: no update at step 20 (a ceil would make one)."""
    _, _, updater, updates = trained(steps=27, total=27)
    assert updater.schedule.t_end == 20 and updates == [4, 8, 12, 16]


def test_each_update_drops_the_cosine_fraction_of_its_own_step():
    """The schedule was tested alone: a mutant handing the updater the previous update's fraction, or alpha
    undecayed, passed every test."""
    model, opt, updater, _ = trained(steps=0)
    seen, select = [], updater.select
    updater.select = lambda layer, scores, fraction: (seen.append((updater.step_count, fraction)),
                                                      select(layer, scores, fraction))[1]
    x, y = make_data("mlp", 0)
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updater.step()
    assert sorted({t for t, _ in seen}) == [4, 8, 12]
    for t, fraction in seen:
        assert fraction == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * t / 30)))


def test_srigl_without_ablation_never_ablates():
    """The same run ablates neurons with ablation on (checked first, so that the test can fail)."""
    def ablated(ablation):
        model, _, updater, _ = trained(steps=44, total=60, sparsity=0.95, delta_t=2, gamma_sal=0.95,
                                       ablation=ablation)
        return sum(layer["ablated_neurons"] for layer in updater.stats()["layers"].values())

    assert ablated(True) > 0
    assert ablated(False) == 0


def test_one_stray_weight_outside_the_masks_refuses_condense():
    model, _, updater, _ = trained()
    updater.close()
    _, layer = list(sparse_layers(model))[0]
    with torch.no_grad():
        layer.weight[outside(layer)] = 0.5
    with pytest.raises(LayerError, match="outside their"):
        condense(model)
