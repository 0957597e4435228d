"""How dense-form choices stay honest: operands replaced or a bias removed after a choice, the whole-forward
check's saving per chosen layer, untimed first calls, each path timed long enough and in turns, choices
forgotten under another thread count. Each test failed on a mutant the rest of the suite let through
(mutation probe, session 43)."""

import copy
import pickle

import pytest
import torch

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn import dense_fallback
from srigl_compile.zoo import ResNet
from tests.codegen.dense_forms import chosen_dense, force, forms_of, sparse_model

pytestmark = pytest.mark.tvm


def test_an_operand_replaced_by_assignment_drops_the_form(monkeypatch, short_trials):
    """``layer.values = new`` gives a new tensor at the same version as the old one: the form must see it."""
    model, lowered, x = chosen_dense(monkeypatch)
    fc = lowered.block.fc
    with torch.no_grad():
        fc.values = fc.values * 2
        model.block.fc.weight.mul_(2)
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)
    assert "_dense_form" not in fc.__dict__


def test_a_bias_removed_after_a_dense_choice_is_not_computed_with(monkeypatch, short_trials):
    """Fewer operands than the form watched: stale (the dense form would keep adding the old bias)."""
    _, lowered, x = chosen_dense(monkeypatch)
    fc = lowered.block.fc
    fc.bias = None
    with torch.no_grad(), pytest.raises(ValueError, match="has_bias=True, got bias=None"):
        lowered(x)  # (the kernel's own check: it was built with a bias)
    assert "_dense_form" not in fc.__dict__


def test_keep_if_faster_asks_forward_saving_s_per_chosen_layer(monkeypatch, short_trials):
    force(monkeypatch, "dense")
    lowered = lower(sparse_model(0.5), progress=False)
    forms = forms_of(lowered)
    assert len(forms) == 4

    def forward_seconds(model, x):
        model(x)
        dense = any(any(f.choices.values()) for f in forms.values())
        return 1.0 - 2 * dense_fallback.FORWARD_SAVING_S if dense else 1.0  # (saves 2 layers' worth, not 4)

    monkeypatch.setattr(dense_fallback, "_forward_seconds", forward_seconds)
    dense_fallback.settle_trials(lowered, torch.randn(2, 16, 10, 10))
    assert all(not any(form.choices.values()) for form in forms.values())


def test_keep_if_faster_does_not_time_its_first_forward_of_each_way(monkeypatch, short_trials):
    force(monkeypatch, "dense")
    lowered = lower(sparse_model(0.5), progress=False)
    forms = forms_of(lowered)
    seen = []

    def forward_seconds(model, x):
        model(x)
        seen.append(None)
        return 0.0 if len(seen) == 1 else 1.0  # (only the untimed warm-up forward with the dense paths is fast)

    monkeypatch.setattr(dense_fallback, "_forward_seconds", forward_seconds)
    dense_fallback.settle_trials(lowered, torch.randn(2, 16, 10, 10))
    assert all(not any(form.choices.values()) for form in forms.values())


def test_a_trials_first_call_is_not_timed(monkeypatch, short_trials):
    lowered = lower(sparse_model(0.5), progress=False)
    form = lowered.block.fc._dense_form
    with torch.no_grad():
        lowered(torch.randn(2, 16, 10, 10))
    (trial,) = form.trials.values()
    assert trial.calls == 1 and all(times == [] for times in trial.times)


def test_a_trial_runs_until_each_path_ran_budget_s(monkeypatch):
    """The kernel's calls here take well under BUDGET_S, the dense path's (timed at 1 s) over it: the trial goes
    on until the kernel has run BUDGET_S too (here: to MAX_ROUNDS)."""
    monkeypatch.setattr(dense_fallback, "ROUNDS", 1)
    monkeypatch.setattr(dense_fallback, "BUDGET_S", 0.5)
    monkeypatch.setattr(dense_fallback, "_timed", lambda call: (call(), 1.0)[1])
    lowered = lower(sparse_model(0.5), progress=False)
    form = lowered.block.fc._dense_form
    with torch.no_grad():
        for _ in range(3):
            lowered(torch.randn(2, 16, 10, 10))
    assert form.trials and not form.choices


def test_choices_are_forgotten_under_another_thread_count(monkeypatch, short_trials):
    """The module docstring: a model loaded with another CPU, core or thread count forgets its choices."""
    _, lowered, _ = chosen_dense(monkeypatch)
    form = lowered.block.fc._dense_form
    assert form.choices
    data = pickle.dumps(form)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    assert pickle.loads(data).choices == {}


def test_a_trial_takes_turns_between_the_paths(monkeypatch, short_trials):
    """Alternating order (the second call of the two finds warmer caches)."""
    lowered = lower(sparse_model(0.5), progress=False)
    fc = lowered.block.fc
    form = fc._dense_form
    order = []
    run, kernel_path = form.run, fc.kernel_path
    monkeypatch.setattr(form, "run",
                        lambda x, residual, variant=None: order.append("dense") or run(x, residual, variant))
    monkeypatch.setattr(fc, "kernel_path", lambda x, residual: order.append("kernel") or kernel_path(x, residual))
    with torch.no_grad():
        for _ in range(2):
            lowered(torch.randn(2, 16, 10, 10))
    assert order == ["kernel", "dense", "dense", "kernel"]


def test_a_float64_residual_gives_the_float64_sum_at_a_shape_that_chose_the_dense_path(monkeypatch, short_trials):
    """A dense form computes only what it takes: a residual other than float32 goes to the kernel's path, which
    adds it as torch does (float32 output + float64 residual = float64), even at a shape whose trial chose the
    dense path (a 1x1 convolution's sgemm path would add it in place into its float32 product)."""
    torch.manual_seed(0)
    masked = sparsify(ResNet(10, blocks=(1,), width=8), SRigLConfig(sparsity=0.5)).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 3, 16, 16),), progress=False)
    conv3 = lowered.layers[0].conv3
    form = conv3.__dict__.get("_dense_form")
    assert form is not None and form.pointwise and conv3.fused_epilogue and "add" in conv3.epilogue
    force(monkeypatch, "dense")
    x = torch.randn(1, conv3.in_channels, 8, 8)
    residual = torch.randn(1, conv3.out_channels, 8, 8)
    key = (x.shape, residual.shape)
    with torch.no_grad():
        for _ in range(2):  # (the shape's trial: one untimed call, one timed)
            conv3(x, residual=residual)
        assert form.choices == {key: True}
        want = conv3(x, residual=residual).double()
        for variant in ("matmul", "conv2d"):  # (whichever dense computation the trial found faster)
            form.variants[key] = variant
            # a copy of the settled layer (as a server makes, or save_lowered / load_lowered) keeps the choice
            served = copy.deepcopy(conv3)
            assert served._dense_form.choices == {key: True} and served._dense_form.variants[key] == variant
            got = served(x, residual=residual.double())
            assert got.dtype == torch.float64, variant
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
