"""fp16 autocast with a GradScaler: a step the scaler skips (inf/NaN gradients) is not recorded into the dense
gradient window, and recorded gradients are divided by the loss scale they were computed at."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srigl_compile import SRigLConfig, SRigLUpdater, sparse_layers, sparsify
from tests.models import make_data
from tests.models import updater_mlp as mlp

DELTA_T, WINDOW = 4, 2  # the update after step 4 scores the gradients of steps 3 and 4


def sparse_mlp():
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, distribution="uniform", delta_t=DELTA_T, grad_accumulation_n=WINDOW, seed=0)
    return sparsify(mlp(), config), config


def run(steps: dict[int, str], *, pass_scaler: bool = True, init_scale: float = 2.0 ** 16):
    """Train DELTA_T steps with autocast fp16 + GradScaler. ``steps[t]``: "overflow" makes step t's loss infinite
    (the scaler skips it), "idle" does nothing but ``updater.step()``; other steps train normally. Returns the model,
    the scaler and the window of gradients the update scored (divided by the window length)."""
    model, config = sparse_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    updater = SRigLUpdater(model, opt, config, total_steps=40, grad_scaler=scaler if pass_scaler else None)
    scored, score = {}, updater.compute_scores

    def recording_scores(name, layer):
        scored[name] = updater._tap.buffers[name].clone()
        return score(name, layer)

    updater.compute_scores = recording_scores
    x, y = make_data("mlp", 0)
    for t in range(1, DELTA_T + 1):
        if steps.get(t) != "idle":
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            if steps.get(t) == "overflow":
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        updater.step()
    return model, scaler, scored


def masks(model):
    return {name: layer.mask.clone() for name, layer in sparse_layers(model)}


def assert_same_masks(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.parametrize("pass_scaler", [True, False])
def test_a_step_the_scaler_skips_is_not_recorded(pass_scaler):
    """Step 3 overflows: the update scores step 4's gradient alone, as in a run where step 3 did not happen (the
    same weights: a skipped step changes nothing). Unscaled, the two windows agree although the loss scale halved."""
    model, scaler, scored = run({3: "overflow"}, pass_scaler=pass_scaler)
    assert scaler.get_scale() == 2.0 ** 15  # the scaler did skip step 3
    reference, reference_scaler, reference_scored = run({3: "idle"}, pass_scaler=pass_scaler)
    assert reference_scaler.get_scale() == 2.0 ** 16
    assert scored.keys() == reference_scored.keys() and scored
    for name in scored:
        assert torch.isfinite(scored[name]).all()
        # with the scaler passed the windows are unscaled alike; without it step 4 was scaled by 2^15 against 2^16
        factor = 1.0 if pass_scaler else 0.5
        torch.testing.assert_close(scored[name], reference_scored[name] * factor, rtol=1e-3, atol=1e-8)
    if pass_scaler:
        assert_same_masks(masks(model), masks(reference))


def test_recorded_gradients_are_unscaled_when_the_scaler_is_passed():
    """Two runs that differ only in the loss scale record the same window."""
    _, _, high = run({})
    _, _, low = run({}, init_scale=2.0 ** 8)
    for name in high:
        assert high[name].abs().max() < 1e3  # not 2^16 times the gradient
        torch.testing.assert_close(high[name], low[name], rtol=1e-3, atol=1e-6)


def test_all_steps_of_the_window_skipped_leaves_the_masks_with_a_warning():
    before, _ = sparse_mlp()
    with pytest.warns(UserWarning, match="took none of the 2 steps of its gradient window: a GradScaler skipped them"):
        after, _, scored = run({3: "overflow", 4: "overflow"})
    assert not scored
    assert_same_masks(masks(before), masks(after))


def test_skipped_steps_of_an_open_window_survive_a_checkpoint():
    """Steps 3 and 4 both skipped, with a checkpoint between them: the resumed updater still knows step 3 was
    skipped, so the update after step 4 is skipped with a warning instead of failing for want of gradients."""
    model, config = sparse_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigLUpdater(model, opt, config, total_steps=40)
    x, y = make_data("mlp", 0)
    for t in range(1, 4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if t != 3:  # step 3: backward but no optimizer step, as when a scaler skips it
            opt.step()
        updater.step()
    state = updater.state_dict()
    assert state["window_skips"] == 1
    resumed = SRigLUpdater(model, opt, config, total_steps=40)
    resumed.load_state_dict(state)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="took none of the 2 steps of its gradient window: a GradScaler skipped them"):
        assert resumed.step() is False  # (an update step, skipped: the masks were not updated)


def test_an_updater_built_before_fully_shard_replaced_the_weights_says_so():
    from srigl_compile import ConfigError

    model, config = sparse_mlp()
    updater = SRigLUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=40)
    model[2].weight = torch.nn.Parameter(model[2].weight.detach().clone())  # what fully_shard does to each weight
    with pytest.raises(ConfigError, match="layer '2': its weight was replaced .* after wrapping"):
        updater.step()
