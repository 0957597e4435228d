"""SRigLUpdater in the ways a training probe (2026-12-06) found it wrong or unclear: static masks never checked
(an optimizer with a dense update drifted masked weights silently), momentum left from dense training, an optimizer
wrapper (a Hugging Face Trainer's) and an optimizer replaced mid-run."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from srigl_compile import ConfigError, InvariantError, SRigLConfig, SRigLUpdater, sparse_layers, sparsify
from tests.models import make_data
from tests.models import updater_mlp as mlp


class _DenseNudge(torch.optim.SGD):
    """SGD plus, from its ``start``-th step on, a small step on every weight, gradient or not (as Muon's
    orthogonalised update does)."""

    def __init__(self, params, start, **options):
        super().__init__(params, **options)
        self.start, self.steps = start, 0

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3 if self.steps > self.start else 0.0)


def _train(model, optimizer, updater, steps, seed=0):
    x, y = make_data("mlp", seed)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        updater.step()


@pytest.mark.parametrize("method, total, start, caught", [("static", 40, 0, 4), ("srigl", 10, 4, 8)])
def test_masked_weights_moved_by_the_optimizer_are_caught_where_no_update_comes(method, total, start, caught):
    """Static masks never update, and srigl's freeze at T_end (here 7, after one update at step 4): the weights
    are checked every delta_t steps all the same."""
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4, method=method)
    model = sparsify(mlp(), config)
    optimizer = _DenseNudge(model.parameters(), start, lr=0.01)
    updater = SRigLUpdater(model, optimizer, config, total_steps=total)
    with pytest.raises(InvariantError, match=rf"weights outside its mask are not zero at the mask check of step "
                                             rf"{caught}:"):
        _train(model, optimizer, updater, 12)


def test_momentum_left_from_dense_training_is_zeroed_outside_the_masks_when_the_updater_is_built():
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_data("mlp", 0)
    for _ in range(3):  # dense warm-up: momentum everywhere
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    config = SRigLConfig(sparsity=0.8, delta_t=20)
    sparsify(model, config, inplace=True)
    updater = SRigLUpdater(model, optimizer, config, total_steps=100)
    for _, layer in sparse_layers(model):
        momentum = optimizer.state[layer.weight]["momentum_buffer"]
        assert not momentum[~layer.mask].any() and momentum[layer.mask].any()
    _train(model, optimizer, updater, 5)  # (before the first update: the momentum used to move masked weights)
    updater.check_invariants()


class _Wrapper(torch.optim.Optimizer):
    """What accelerate's AcceleratedOptimizer looks like to the updater: an Optimizer that never ran
    Optimizer.__init__ (no hooks of its own) and steps the optimizer it holds."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def test_an_optimizer_wrapper_is_unwrapped_and_a_refused_optimizer_leaves_the_running_updater_working():
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4)
    model = sparsify(mlp(), config)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = _Wrapper(inner)
    updater = SRigLUpdater(model, wrapped, config, total_steps=40)
    assert updater.optimizer is inner
    masks = {name: layer.mask.clone() for name, layer in sparse_layers(model)}
    _train(model, wrapped, updater, 4)  # (the wrapper's step steps the inner one, where the hooks sit)
    assert any(not torch.equal(masks[name], layer.mask) for name, layer in sparse_layers(model))
    with pytest.raises(TypeError, match="or a wrapper holding one as .optimizer"):
        SRigLUpdater(model, object(), config, total_steps=40)
    _train(model, wrapped, updater, 4)  # (the refused one took nothing over)
    updater.check_invariants()


def test_an_optimizer_replaced_mid_run_is_named_in_the_skipped_update_warning():
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4)
    model = sparsify(mlp(), config)
    updater = SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=40)
    replacement = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="or another optimizer steps the model now"):
        _train(model, replacement, updater, 4)
    with pytest.warns(UserWarning, match="existed already"):  # (the remedy: a new updater with the new optimizer)
        SRigLUpdater(model, replacement, config, total_steps=40)
    with pytest.raises(ConfigError, match="replaced by a newer one"):
        updater.step()


RESTING = {  # optimizer -> (a state entry, its value for a weight without gradients)
    "adamax": (lambda p: torch.optim.Adamax(p, lr=1e-2, eps=1e-6), "exp_inf", 1e-6),
    "rprop": (lambda p: torch.optim.Rprop(p, lr=5e-3), "step_size", 5e-3),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1), "sum", 0.1),
}


@pytest.mark.parametrize("name", sorted(RESTING))
def test_state_outside_the_masks_rests_where_the_optimizer_keeps_it(name):
    """Adamax writes eps into exp_inf, Rprop keeps step sizes, Adagrad starts its sums at a set value: outside
    the masks the state rests there, not at 0. check_invariants used to refuse such runs between updates, and a
    regrown weight's Rprop step size was reset to 0 (it crawled back from the 1e-6 minimum)."""
    make, key, resting = RESTING[name]
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4)
    model = sparsify(mlp(), config)
    optimizer = make(model.parameters())
    updater = SRigLUpdater(model, optimizer, config, total_steps=40)
    _train(model, optimizer, updater, 6)  # (an update at 4, then two steps of the next window)
    updater.check_invariants()
    for _, layer in sparse_layers(model):
        state = optimizer.state[layer.weight][key]
        torch.testing.assert_close(state[~layer.mask], torch.full_like(state[~layer.mask], resting))
        with torch.no_grad():
            state[~layer.mask] = resting * 3  # (as if something had moved it)
        with pytest.raises(InvariantError, match=rf"optimizer state '{key}' outside the mask is not what it holds"):
            updater.check_invariants()
        break


def _after_one_update():
    """(model, optimizer, updater) of an MLP trained 4 steps, one mask update (delta_t 4)."""
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4)
    model = sparsify(mlp(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigLUpdater(model, optimizer, config, total_steps=40)
    _train(model, optimizer, updater, 4)
    return model, optimizer, updater


def test_every_layer_frozen_mid_run_is_named_as_frozen_and_step_says_nothing_was_updated():
    """A probe found freezing them all (training only a dense head) raised an error blaming the training loop."""
    model, optimizer, updater = _after_one_update()
    names = [name for name, _ in sparse_layers(model)]
    for name in names:
        model.get_submodule(name).weight.requires_grad_(False)
    before = {name: model.get_submodule(name).mask.clone() for name in names}
    _train(model, optimizer, updater, 3)
    x, y = make_data("mlp", 0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=rf"layers {names!r} were frozen \(requires_grad=False\)".replace("[", r"\[")):
        assert updater.step() is False  # (step 8: an update step, and no mask could change)
    assert all(torch.equal(model.get_submodule(name).mask, before[name]) for name in names)
    updater.check_invariants()


def test_step_says_false_for_an_update_the_scaler_skipped_and_true_for_one_it_made():
    """A probe found True for an update skipped because a GradScaler skipped every step of its window (the
    reference loop recorded the update in its history)."""
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.9, distribution="uniform", delta_t=3)
    model = sparsify(mlp(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    updater = SRigLUpdater(model, optimizer, config, total_steps=40, grad_scaler=scaler)
    x, y = make_data("mlp", 0)
    returned = []
    for step in range(1, 7):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("inf") if step == 3 else 1.0)  # (overflow: step 3 skipped)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step == 3:
            with pytest.warns(UserWarning, match="mask update at step 3 skipped"):
                returned.append(updater.step())
        else:
            returned.append(updater.step())
    assert returned == [False, False, False, False, False, True]


def test_a_layer_frozen_mid_run_is_named_as_frozen_and_left_as_it_is():
    model, optimizer, updater = _after_one_update()
    model[0].weight.requires_grad_(False)
    before = model[0].mask.clone()
    with pytest.warns(UserWarning, match=r"layers \['0'\] were frozen \(requires_grad=False\) after the updater"):
        _train(model, optimizer, updater, 4)
    assert torch.equal(model[0].mask, before)
    updater.check_invariants()


def test_a_data_parallel_wrapper_leaves_the_layer_names_and_its_checkpoint_loads_unwrapped():
    """A probe found nn.DataParallel's "module." in every layer name: its checkpoints loaded only into a wrapped
    model (DDP and torch.compile were unwrapped already)."""
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, delta_t=4)
    model = sparsify(mlp(), config)
    wrapped = torch.nn.DataParallel(model)  # (no GPU: it calls the module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigLUpdater(wrapped, optimizer, config, total_steps=40)
    assert list(updater.layers) == [name for name, _ in sparse_layers(model)]
    _train(wrapped, optimizer, updater, 4)
    state = updater.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the new updater takes the layers over)
        plain = SRigLUpdater(model, optimizer, config, total_steps=40)
    plain.load_state_dict(state)
