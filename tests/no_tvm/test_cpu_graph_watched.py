"""cpu_graph records again when the model changes under it (no TVM): parameters and buffers changed in place or
replaced, tensors made in inference mode (named: unwatchable), modules switched between train and eval, and public
plain attributes set (a scaling factor, a flag; ``replay_checks.Settings``), while private bookkeeping is not
watched."""

import copy

import pytest
import torch
import torch.nn as nn

from srigl_compile import cpu_graph


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Derived(nn.Module):
    """Keeps a tensor derived from its parameter per version of it, as lowered layers keep their offsets per
    version of their indices: Python that a replay does not run."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))
        self._version = None

    def forward(self, x):
        if self._version != self.w._version:
            self._doubled, self._version = self.w.detach() * 2, self.w._version
        return x * self._doubled


def test_in_place_parameter_changes_record_again():
    model = _Derived()
    graphed = cpu_graph(model)
    x = torch.randn(3, 5)
    with torch.no_grad():
        _same(graphed(x), x * model.w * 2)
        model.w.mul_(3.0)  # what the recording derived from w is stale now
        _same(graphed(x), x * model.w * 2)
        model.load_state_dict({"w": torch.randn(5)})
        _same(graphed(x), x * model.w * 2)
    assert graphed.replays == 3


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_replaced_parameters_and_buffers_record_again():
    """Replacing a tensor (load_state_dict(assign=True), an attribute assigned) left replays computing with the old
    one, silently (a probe, 2026-12-06): only in-place changes were seen."""
    model = _Scaled().eval()
    graphed = cpu_graph(model)
    x = torch.randn(3, 5)
    with torch.no_grad():
        _same(graphed(x), model(x))
        model.load_state_dict({"fc.weight": torch.randn(4, 5), "fc.bias": torch.randn(4), "scale": torch.tensor(3.0)},
                              assign=True)
        _same(graphed(x), model(x))
        model.scale = torch.tensor(-1.0)
        _same(graphed(x), model(x))
        model.fc.bias = nn.Parameter(torch.randn(4))
        _same(graphed(x), model(x))
        _same(graphed(x), model(x))
    assert len(graphed._entries) == 1


def test_a_model_made_in_inference_mode_is_replayed_and_its_unwatchable_tensors_are_named():
    with torch.inference_mode():
        model = copy.deepcopy(_Scaled().eval())  # (inference tensors: no version counter)
        graphed = cpu_graph(model)
        x = torch.randn(3, 5)
        with pytest.warns(UserWarning, match="3 parameters / buffers of the model were made under "
                                             r"torch.inference_mode\(\)"):
            _same(graphed(x), model(x))
        _same(graphed(x), model(x))
        model.scale = torch.tensor(5.0)  # (replaced: seen)
        _same(graphed(x), model(x))


def test_train_mode_runs_eagerly_and_switched_modules_record_again():
    """A recording made in eval mode replayed after model.train() ran eval BatchNorm (a probe found it); recorded
    in train mode, every run while recording would update the running statistics once more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)).eval()
    twin = copy.deepcopy(model)
    graphed = cpu_graph(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        _same(graphed(x), twin(x))
        model.train()
        twin.train()
        with pytest.warns(UserWarning, match=r"the model is in train mode .*model.eval\(\) to replay"):
            _same(graphed(x), twin(x))
        _same(graphed(x), twin(x))  # (batch statistics, and the running ones updated as eagerly)
        torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
        model.eval()
        twin.eval()
        _same(graphed(x), twin(x))
        model[2].train()  # (a module without train-mode behaviour of its own: recorded again, in its new mode)
        _same(graphed(x), twin(x))
    entry = next(iter(graphed._entries.values()))
    assert graphed.replays == 3 and not entry.stale()
    model[2].eval()
    assert entry.stale()


class _WithSettings(nn.Module):
    shift = 0.0  # (a class attribute: setting it on an instance adds one there)

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale, self.squash, self.axes = 2.0, False, (0,)

    def forward(self, x):
        y = self.linear(x) * self.scale + self.shift
        return torch.tanh(y) if self.squash else y.flip(self.axes)


@pytest.mark.parametrize("change", ["float", "flag", "tuple", "class attribute", "deleted"])
def test_a_changed_plain_attribute_records_again(change):
    """A forward reads its modules' plain attributes into Python: a replay repeats the values recorded, so setting
    one (a scaling factor, a flag) must record again, as switching train/eval does."""
    torch.manual_seed(0)
    model = _WithSettings()
    graphed = cpu_graph(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        _same(graphed(x), model(x))
        _same(graphed(x), model(x))
        if change == "float":
            model.scale = 0.5
        elif change == "flag":
            model.squash = True
        elif change == "tuple":
            model.axes = (1,)
        elif change == "class attribute":
            model.shift = 3.0
        else:
            model.shift = 3.0
            _same(graphed(x), model(x))
            del model.shift
        _same(graphed(x), model(x))
        _same(graphed(x), model(x))


def test_private_attributes_are_bookkeeping_not_settings():
    """``_name`` attributes are the modules' own bookkeeping (a lowered layer's last input shape), which eager calls
    of other signatures change: watching them would record every signature again after each such call."""
    model = _WithSettings()
    graphed = cpu_graph(model)
    with torch.no_grad():
        graphed(torch.randn(3, 4))
        entry = next(iter(graphed._entries.values()))
        model._calls = 1
        graphed(torch.randn(3, 4))
    assert graphed.replays == 2 and list(graphed._entries.values()) == [entry]
