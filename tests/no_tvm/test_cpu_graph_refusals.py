"""What cpu_graph's recording check refuses or guards: train-mode dropout, changed enum settings, drift and
another number of outputs, global hooks, computing outside the dispatcher, writes into inputs, uint8 masks, NaN
in a read value. Each test failed on a mutant the rest of the suite let through (mutation probe, session 43)."""

import enum
import warnings

import pytest
import torch
import torch.nn as nn

from srigl_compile import ReplayError, cpu_graph


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# dropout modules in train mode ------------------------------------------------------------------------------

def test_a_dropout_model_in_train_mode_runs_eagerly_with_a_warning():
    """Only batch norm was seen as train mode: a dropout model in train mode was recorded, and its check raised
    ReplayError (its draws differ from run to run) where eager works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train()
    graphed = cpu_graph(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match=r"the model is in train mode"):
            got = graphed(x)
        torch.manual_seed(1)
        _same(got, model(x))
    assert graphed.replays == 0 and not graphed._entries


# enum settings ------------------------------------------------------------------------------------------------

class _Mode(enum.Enum):
    DOUBLE = 1
    NEGATE = 2


class _EnumSetting(nn.Module):
    def __init__(self):
        super().__init__()
        self.mode = _Mode.DOUBLE

    def forward(self, x):
        return x * 2 if self.mode is _Mode.DOUBLE else -x


def test_a_changed_enum_attribute_records_again():
    """``enum.Enum`` values are plain settings (``replay_checks._PLAIN``): left out, switching one kept replaying
    the old path."""
    model = _EnumSetting()
    graphed = cpu_graph(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        _same(graphed(x), x * 2)
        model.mode = _Mode.NEGATE
        _same(graphed(x), -x)


# the check's tolerance ---------------------------------------------------------------------------------------

class _Drifting(nn.Module):
    """Changes a little from call to call through a private counter."""

    def __init__(self):
        super().__init__()
        self._calls = 0

    def forward(self, x):
        self._calls += 1
        return x + 0.01 * self._calls


def test_a_forward_that_drifts_a_little_from_call_to_call_is_refused():
    """The check compares within 1e-4 / 1e-5: a laxer one took a 0.01 drift as equal and replayed it for ever."""
    graphed = cpu_graph(_Drifting())
    with torch.no_grad(), pytest.raises(ReplayError, match="does not match the eager forward"):
        graphed(torch.ones(2, 3))


# outputs of another structure ---------------------------------------------------------------------------------

class _Alternating(nn.Module):
    """Returns an extra output every other call (a path that changes from call to call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)
        self._calls = 0

    def forward(self, x):
        self._calls += 1
        y = self.linear(x)
        return (y, y.sum()) if self._calls % 2 else (y,)


def test_a_forward_returning_another_number_of_outputs_is_refused():
    """Without comparing the number of leaves, the check compared the common ones only and kept a recording
    that returns another structure than the eager forward."""
    graphed = cpu_graph(_Alternating().eval())
    with torch.no_grad(), pytest.raises(ReplayError, match="does not match the eager forward"):
        graphed(torch.randn(2, 4))


# global hooks ------------------------------------------------------------------------------------------------

def test_global_forward_hooks_are_named():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match=r"forward hooks on \['\(global\)'"):
            cpu_graph(model)(torch.randn(2, 4))
    finally:
        handle.remove()


# the check runs on another input -------------------------------------------------------------------------------

class _OutsideTheDispatcher(nn.Module):
    """Reads its input's memory without the dispatcher (as an extension taking raw pointers does): a recording
    sees no call that computes its output."""

    def forward(self, x):
        import ctypes

        import numpy as np

        raw = np.ctypeslib.as_array((ctypes.c_float * x.numel()).from_address(x.data_ptr())).copy()
        return torch.from_numpy(raw * 2).reshape(x.shape)


def test_a_forward_computing_outside_the_recording_is_refused_by_the_check_on_another_input():
    """The check compares a replay with the eager forward on another input (the first flipped): on the recorded
    input itself, a recording that returns its recorded output passed and was replayed for every input."""
    graphed = cpu_graph(_OutsideTheDispatcher())
    with torch.no_grad(), pytest.raises(ReplayError, match="does not match the eager forward"):
        graphed(torch.randn(2, 3))


# writes into an input are refused, 1-D inputs too ---------------------------------------------------------------

class _AddsToItsInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


def test_a_forward_writing_into_a_1d_input_is_refused():
    graphed = cpu_graph(_AddsToItsInput())
    with torch.no_grad(), pytest.raises(ReplayError, match="writes into its input"):
        graphed(torch.zeros(3))


# a uint8 mask index's output shape follows values -------------------------------------------------------------

class _Uint8Mask(nn.Module):
    def forward(self, x, mask):
        return x[mask].sum() * torch.ones(2)


def test_indexing_by_a_uint8_mask_is_refused():
    """torch reads a uint8 index as a boolean mask (deprecated): its output shape follows the mask's values."""
    graphed = cpu_graph(_Uint8Mask())
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(ReplayError, match="output shape depends"):
        warnings.simplefilter("ignore")
        graphed(torch.randn(4), mask)


# a tensor guard with a NaN ----------------------------------------------------------------------------------------

class _Numpy(nn.Module):
    def forward(self, x):
        import numpy as np

        return torch.from_numpy(np.sin(x.numpy())) + 1


def test_a_nan_where_the_recorded_contents_had_a_number_misses_the_guard():
    graphed = cpu_graph(_Numpy())
    x = torch.randn(3, 4)
    with torch.no_grad():
        _same(graphed(x), _Numpy()(x))
        with_nan = x.clone()
        with_nan[1, 2] = float("nan")
        torch.testing.assert_close(graphed(with_nan), _Numpy()(with_nan), rtol=0, atol=0, equal_nan=True)
    assert graphed.guard_misses == 1
