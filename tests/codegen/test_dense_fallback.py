"""Near-dense lowered layers keep a dense form and run it at the input shapes where it measured faster
(``nn.dense_fallback``): the dense path must compute the layer's own output (ablated neurons, compact layers,
biases, fused epilogues and residuals, strided and padded convolutions), the choice must be measured once per
shape, and anything the form does not take must reach the kernel."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparse_layers, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.nn import dense_fallback
from srigl_compile.nn.settle import settle
from srigl_compile.runtime.checks import KernelDtypeError
from srigl_compile.runtime.spec import apply_epilogue

from .dense_forms import chosen_dense, force, forms_of, sparse_model

pytestmark = pytest.mark.tvm


def test_near_dense_layers_get_a_dense_form_and_sparse_ones_none():
    near_dense = lower(sparse_model(0.5), progress=False)
    assert all(form is not None for form in forms_of(near_dense).values())
    sparse = lower(sparse_model(0.9), progress=False)
    assert all(form is None for form in forms_of(sparse).values())
    off = lower(sparse_model(0.5), LlvmConfig(dense_fallback=False, progress=False))
    assert all(form is None for form in forms_of(off).values())


@pytest.mark.parametrize("path", ["dense", "kernel"])
@pytest.mark.parametrize("ablated", [False, True])
def test_either_path_computes_the_condensed_layers_output(monkeypatch, short_trials, path, ablated):
    model = sparse_model(0.5, ablated)
    lowered = lower(model, progress=False)
    kernels_only = lower(model, LlvmConfig(dense_fallback=False, progress=False))
    forms = forms_of(lowered)
    conv2 = lowered.block.conv2
    assert conv2.fused_epilogue and "add" in conv2.epilogue  # (the residual reaches the form too)
    force(monkeypatch, path)
    for batch in (1, 3):
        x = torch.randn(batch, 16, 10, 10)
        with torch.no_grad():
            for _ in range(2):  # on trial: the kernel's output, bit for bit
                torch.testing.assert_close(lowered(x), kernels_only(x), rtol=0, atol=0)
            for _ in range(2):  # chosen
                torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)
    for form in forms.values():
        assert not form.trials and len(form.choices) == 2 and all(form.choices.values()) == (path == "dense")
        assert (form._weight is not None) == (path == "dense")  # (the dense weight is dropped when unused)


def test_each_shape_has_one_trial(monkeypatch):
    monkeypatch.setattr(dense_fallback, "ROUNDS", 2)
    monkeypatch.setattr(dense_fallback, "BUDGET_S", 0.0)
    force(monkeypatch, "kernel")
    lowered = lower(sparse_model(0.5), progress=False)
    form = lowered.block.fc._dense_form
    dense_calls = []
    run = form.run
    monkeypatch.setattr(form, "run", lambda x, residual, variant=None: dense_calls.append(x.shape[0])
                        or run(x, residual, variant))
    x2, x4 = torch.randn(2, 16, 10, 10), torch.randn(4, 16, 10, 10)
    key2, key4 = (torch.Size([2, 400]), None), (torch.Size([4, 400]), None)
    with torch.no_grad():
        for _ in range(2):  # one untimed call and ROUNDS timed ones, each running both paths
            lowered(x2)
            assert list(form.trials) == [key2] and not form.choices
        for _ in range(3):
            lowered(x2)
        lowered(x4)  # another shape: its own trial
    assert form.choices == {key2: False} and list(form.trials) == [key4]
    assert dense_calls == [2, 2, 2, 4]


def test_settle_finishes_every_trial(monkeypatch):
    monkeypatch.setattr(dense_fallback, "BUDGET_S", float("inf"))  # trials run to MAX_ROUNDS
    force(monkeypatch, "kernel")  # (no dense choice to check on whole forwards: the calls are the trials')
    lowered = lower(sparse_model(0.5), progress=False)
    x = torch.randn(3, 16, 10, 10)
    assert settle(lowered, x) == dense_fallback.MAX_ROUNDS + 1
    assert all(len(form.choices) == 1 and not form.trials for form in forms_of(lowered).values())
    assert settle(lowered, x) == 1
    sparse = lower(sparse_model(0.9), progress=False)  # (no dense forms)
    assert settle(sparse, x) == 1


def test_changed_operands_drop_the_form(monkeypatch, short_trials):
    model, lowered, x = chosen_dense(monkeypatch)
    with torch.no_grad():
        assert lowered.block.fc._dense_form.choices == {(torch.Size([2, 400]), None): True}
        lowered.block.fc.bias.mul_(2)  # in place: the dense form's copy is stale
        out = lowered(x)
        model.block.fc.bias.mul_(2)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert "_dense_form" not in lowered.block.fc.__dict__ and "_dense_form" in lowered.block.conv1.__dict__


def test_a_copy_or_save_made_after_an_in_place_change_computes_with_the_new_operands(monkeypatch, short_trials,
                                                                                       tmp_path):
    """A probe found a deepcopy or save_lowered made between an in-place load_state_dict and the next call kept
    the old dense weights as current: the copy's version counters restart, so it could not see the change."""
    model, lowered, x = chosen_dense(monkeypatch)
    new = {name: tensor * 1.5 if tensor.is_floating_point() else tensor
           for name, tensor in lowered.state_dict().items()}
    with torch.no_grad():
        lowered.load_state_dict(new)  # (in place: assign=False)
        save_lowered(lowered, tmp_path / "model")
        copied, loaded = copy.deepcopy(lowered), load_lowered(tmp_path / "model")
        want = lowered(x)  # (the served model drops its stale forms and computes with the new operands)
        for again in (copied, loaded):
            assert any(form is not None for form in forms_of(again).values())  # (the copies carry the forms ...)
            torch.testing.assert_close(again(x), want, rtol=1e-6, atol=1e-6)
            assert all(form is None for form in forms_of(again).values())  # (... stale: dropped at their first call)


def test_calls_the_form_does_not_take_run_the_kernel(monkeypatch):
    lowered = lower(sparse_model(0.5), progress=False)
    force(monkeypatch, "dense")
    form = lowered.block.conv1._dense_form
    with torch.no_grad():
        lowered.block.conv1(torch.randn(16, 10, 10))  # unbatched: the kernel's path
    assert not form.choices and not form.trials
    with pytest.raises(KernelDtypeError, match="float32"):  # the kernel's typed error, not a silent dense result
        lowered.block.conv1(torch.randn(1, 16, 10, 10, dtype=torch.float64))
    assert not form.choices and not form.trials


def test_saved_and_copied_models_keep_their_choices_on_this_machine_only(monkeypatch, short_trials, tmp_path):
    lowered = lower(sparse_model(0.5), progress=False)
    force(monkeypatch, "dense")
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        for _ in range(2):
            lowered(x)
        want = lowered(x)  # (dense, chosen)
        save_lowered(lowered, tmp_path / "model")
        chosen = {name: form.choices for name, form in forms_of(lowered).items()}
        assert all(len(choices) == 1 and all(choices.values()) for choices in chosen.values())
        for again in (copy.deepcopy(lowered), load_lowered(tmp_path / "model")):
            assert {name: form.choices for name, form in forms_of(again).items()} == chosen
            torch.testing.assert_close(again(x), want, rtol=0, atol=0)
        monkeypatch.setattr(dense_fallback, "machine", lambda: ("another", "cpu"))
        elsewhere = load_lowered(tmp_path / "model")
    assert all(form is not None and not form.choices for form in forms_of(elsewhere).values())


def test_with_bf16_values_the_dense_form_reads_the_same_rounded_weights(monkeypatch, short_trials):
    model = sparse_model(0.5)
    lowered = lower(model, LlvmConfig(value_dtype=torch.bfloat16, progress=False))
    force(monkeypatch, "dense")
    with torch.no_grad():
        for layer in dict(sparse_layers(model)).values():
            layer.weight.copy_(layer.weight.to(torch.bfloat16).float())
        x = torch.randn(2, 16, 10, 10)
        for _ in range(3):
            out = lowered(x)
        assert all(all(form.choices.values()) for form in forms_of(lowered).values())
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_saving_s, chosen", [(10.0, False), (0.0, True)])
def test_the_dense_path_must_save_min_saving_s_a_call(monkeypatch, short_trials, min_saving_s, chosen):
    """With the dense path free (timed at 0) and any margin, it is chosen only when it saves MIN_SAVING_S."""
    monkeypatch.setattr(dense_fallback, "MARGIN", float("inf"))
    monkeypatch.setattr(dense_fallback, "MIN_SAVING_S", min_saving_s)
    monkeypatch.setattr(dense_fallback, "_timed", lambda call: (call(), 0.0)[1])
    lowered = lower(sparse_model(0.5), progress=False)
    with torch.no_grad():
        for _ in range(2):
            lowered(torch.randn(1, 16, 10, 10))
    assert all(len(form.choices) == 1 and all(form.choices.values()) == chosen for form in forms_of(lowered).values())


@pytest.mark.parametrize("dense_saves", [True, False])
def test_settle_keeps_dense_choices_only_if_whole_forwards_run_faster(monkeypatch, short_trials, dense_saves):
    """Whole forwards (timed by ``_forward_seconds``, here by which paths are chosen) decide: every layer's dense
    choice stays, or every one goes back to its kernel and drops its dense weight."""
    force(monkeypatch, "dense")
    lowered = lower(sparse_model(0.5), progress=False)
    forms = forms_of(lowered)
    chosen_seconds, kernel_seconds = (0.5, 1.0) if dense_saves else (1.0, 0.5)

    def forward_seconds(model, x):
        model(x)
        return chosen_seconds if any(any(f.choices.values()) for f in forms.values()) else kernel_seconds

    monkeypatch.setattr(dense_fallback, "_forward_seconds", forward_seconds)
    x = torch.randn(2, 16, 10, 10)
    calls = settle(lowered, x)
    assert calls == 2 + 2 * (1 + dense_fallback.ROUNDS)  # the trials' 2, then 1 + ROUNDS forwards of each
    for form in forms.values():
        assert form.choices == {next(iter(form.choices)): dense_saves} and not form.trials
        assert (form._weight is not None) == dense_saves
    assert settle(lowered, x) == 1  # (decided: nothing to check again)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), lower(sparse_model(0.5), progress=False)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "planar", "channels_last"])
@pytest.mark.parametrize("epilogue", ["", "relu", "add", "add_relu", "gelu"])
def test_a_1x1_convolutions_dense_form_is_its_matrix_product(stride, layout, epilogue):
    """The 1x1 dense form (sgemm on [C, H * W]) equals F.conv2d with the same weight, bias, epilogue and residual,
    for the layouts lowered layers pass each other (planar: channels 208 floats apart on 14x14 images)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(24, 40, 1, stride=stride)
    model = sparsify(nn.Sequential(layer).eval(), SRigLConfig(sparsity=0.5, distribution="uniform"),
                     example_inputs=(torch.randn(1, 24, 14, 14),))
    lowered = lower(model, progress=False)
    form = dataclasses.replace(lowered[0]._dense_form, epilogue=epilogue)
    assert form.pointwise
    x = torch.randn(3, 24, 14, 14)
    if layout == "planar":
        x = torch.full((3, 24, 208), float("nan")).as_strided(x.shape, (24 * 208, 208, 14, 1)).copy_(x)
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    residual = torch.randn(3, 40, *([14 // stride] * 2)) if "add" in epilogue else None
    want = apply_epilogue(F.conv2d(x, form.weight(), form.bias, stride=stride), epilogue, residual)
    for variant in dense_fallback.DENSE_VARIANTS:
        torch.testing.assert_close(form.run(x, residual, variant), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("faster", dense_fallback.DENSE_VARIANTS)
def test_a_1x1_convolutions_trial_keeps_the_faster_dense_computation(monkeypatch, short_trials, faster):
    """Neither sgemm nor oneDNN's convolution is the faster everywhere: a 1x1 layer's trial times both and its
    dense calls at that shape run the faster; other layers have one dense computation."""
    force(monkeypatch, "dense")
    lowered = lower(sparse_model(0.5), progress=False)
    shortcut, fc = lowered.block.shortcut._dense_form, lowered.block.fc._dense_form
    assert shortcut.pointwise and shortcut.dense_variants() == dense_fallback.DENSE_VARIANTS
    assert fc.dense_variants() == ("",)
    timed = []
    run = dense_fallback.DenseForm.run
    monkeypatch.setattr(dense_fallback.DenseForm, "run", lambda self, x, residual, variant=None:
                        timed.append(variant) or run(self, x, residual, variant))
    monkeypatch.setattr(dense_fallback, "_timed", lambda call: (call(), 1.0 if timed[-1] == faster else 2.0)[1])
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        for _ in range(2):
            lowered(x)
        assert shortcut.variants == {(x.shape, None): faster} and not fc.variants
        timed.clear()
        lowered(x)
    assert timed == [None] * 4  # (each layer's chosen dense path: the variant found from its shape)
    y = torch.randn(2, 16, 10, 10)
    torch.testing.assert_close(run(shortcut, y, None), run(shortcut, y, None, faster), rtol=0, atol=0)


def test_a_shape_first_seen_while_recording_runs_the_kernel_without_a_trial(monkeypatch, short_trials):
    """A recording replays whatever its forward ran: a trial recorded there would run both paths at every replay
    and never end, so a shape without a choice runs only the kernel while recording (and its trial waits for an
    eager call)."""
    from srigl_compile.runtime.call_record import record

    force(monkeypatch, "dense")
    model = sparse_model(0.5)
    lowered = lower(model, progress=False)
    kernels_only = lower(model, LlvmConfig(dense_fallback=False, progress=False))
    forms = forms_of(lowered)
    x = torch.randn(2, 16, 10, 10)  # (no eager call at this shape yet: every layer's shape is new)
    with torch.no_grad():
        recording = record(lowered, (x,), {})
        assert all(not form.trials and not form.choices for form in forms.values())
        assert not [call for call in recording.calls if "mm" in str(call.fn) or "convolution" in str(call.fn)]
        torch.testing.assert_close(recording.replay([x]), kernels_only(x), rtol=0, atol=0)
        lowered(x)  # eager: the trial opens as before
    assert all(list(form.trials) for form in forms.values())


def test_a_trial_another_thread_ended_first_is_not_ended_again(monkeypatch, short_trials):
    """Two threads on one trial: both calls see it over, the second deleted it again (KeyError, 1 call in 240
    with the defaults in the probe). The thread whose call finds it gone returns its kernel output."""
    force(monkeypatch, "dense")
    lowered = lower(sparse_model(0.5), progress=False)
    form = lowered.block.fc._dense_form
    record = dense_fallback._Trial.record

    def ended_elsewhere_too(trial, *seconds):
        over = record(trial, *seconds)
        if over and any(t is trial for t in form.trials.values()):
            form.trials.clear()  # (the other thread's call ended it between this record and its deletion)
        return over

    monkeypatch.setattr(dense_fallback._Trial, "record", ended_elsewhere_too)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        for _ in range(2):
            lowered(x)
    assert not form.trials and not form.choices  # (this call left the choice to the thread that ended it)


def test_settle_stops_calling_once_stale_forms_are_dropped(monkeypatch, short_trials):
    """settle kept the forms it listed first: dropped mid-trial (operands loaded in place), their open trials kept it
    calling to MAX_ROUNDS + 2."""
    lowered = lower(sparse_model(0.5), progress=False)
    other = lower(sparse_model(0.5, ablated=False), progress=False)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        lowered(x)  # (trials open)
        lowered.load_state_dict(other.state_dict())
        assert dense_fallback.settle_trials(lowered, x) == 1
    assert not any(forms_of(lowered).values())


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_a_1x1_convolution_padded_by_name_is_pointwise(padding):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(24, 40, 1, padding=padding)).eval(),
                     SRigLConfig(sparsity=0.5, distribution="uniform"), example_inputs=(torch.randn(1, 24, 7, 7),))
    form = lower(model, progress=False)[0]._dense_form
    assert form.pointwise and form.dense_variants() == dense_fallback.DENSE_VARIANTS
    x = torch.randn(2, 24, 7, 7)
    for variant in dense_fallback.DENSE_VARIANTS:
        torch.testing.assert_close(form.run(x, None, variant), model(x), rtol=1e-5, atol=1e-5)


