"""Lowered models made, loaded or copied under ``torch.inference_mode()`` (a probe, 2026-12-06: every call of such a
model raised "Inference tensors do not track version counter", and with a dense form so did the load itself).

Tensors made in inference mode have no version counter, which the kernels' prepared calls and the dense form read
to see in-place changes; the condensed layers keep normal copies of such operands (``nn/condensed.py``)."""

import copy

import pytest
import torch

from srigl_compile import load_lowered, lower, save_lowered

from .dense_forms import chosen_dense, forms_of, sparse_model


def _make(how: str, lowered, masked, tmp_path):
    """``lowered`` made again ``how``, under inference mode."""
    save_lowered(lowered, tmp_path / "saved")
    torch.save(lowered, tmp_path / "whole.pt")
    with torch.inference_mode():
        return {"lower": lambda: lower(masked, progress=False),
                "load_lowered": lambda: load_lowered(tmp_path / "saved"),
                "deepcopy": lambda: copy.deepcopy(lowered),
                "torch.load": lambda: torch.load(tmp_path / "whole.pt", weights_only=False)}[how]()


def _operands(model):
    return [t for layer in forms_of(model) for t in dict(model.named_modules())[layer].buffers()]


@pytest.mark.parametrize("how", ["lower", "load_lowered", "deepcopy", "torch.load"])
@pytest.mark.parametrize("sparsity", [0.9, 0.5], ids=["sparse", "near-dense"])
def test_a_model_made_in_inference_mode_runs_in_and_out_of_it(tmp_path, how, sparsity):
    masked = sparse_model(sparsity, ablated=True)
    lowered = lower(masked, progress=False)
    made = _make(how, lowered, masked, tmp_path)
    assert not any(t.is_inference() for t in _operands(made))
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        expected = masked(x)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            for _ in range(3):
                torch.testing.assert_close(made(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["load_lowered", "deepcopy", "torch.load"])
def test_dense_choices_survive_and_in_place_loads_in_inference_mode_still_drop_them(monkeypatch, short_trials,
                                                                                   tmp_path, how):
    masked, lowered, x = chosen_dense(monkeypatch)
    made = _make(how, lowered, masked, tmp_path)
    forms = forms_of(made)
    assert forms and all(form is not None and form.choices for form in forms.values())
    with torch.inference_mode():
        torch.testing.assert_close(made(x), masked(x), rtol=1e-5, atol=1e-5)
        assert all(form is not None for form in forms_of(made).values())  # (still watching the operands)
        other = sparse_model(0.5)
        for parameter in other.parameters():
            parameter.mul_(1.5)  # (other values, the same masks and shapes)
        made.load_state_dict(lower(other, progress=False).state_dict())  # (in place: the versions move)
        torch.testing.assert_close(made(x), other(x), rtol=1e-5, atol=1e-5)
    assert not any(forms_of(made).values())


def test_an_operand_assigned_from_inference_mode_is_kept_as_a_normal_tensor():
    lowered = lower(sparse_model(0.9), progress=False)
    layer = lowered.block.fc
    with torch.inference_mode():
        values = layer.values * 1.0
        layer.values = values
    assert values.is_inference() and not layer.values.is_inference()
    assert torch.equal(layer.values, values)
