"""What the kernel ops and lowered layers refuse before a kernel runs: operands converted after lowering, a bias
or residual a kernel was not built for, residuals only the output broadcasts to, libraries for another CPU,
a column equal to the input width, tracked residuals and non-leaf inputs; weight stand-ins' devices. Each test
failed on a mutant the rest of the suite let through (mutation probe, session 43)."""

import types

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.errors import InferenceOnlyError, LayerError
from srigl_compile.nn.condensed import CondensedLinear
from srigl_compile.nn.condensed_tensors import WeightStandIn
from srigl_compile.runtime.checks import (
    KernelDeviceError,
    KernelDtypeError,
    KernelShapeError,
    broadcasts_to,
    check_residual_shape,
    check_runs_here,
)
from srigl_compile.runtime.linear_op import condensed_linear
from tests.models import WithResidual

pytestmark = pytest.mark.tvm


def _linear(bias=True):
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40, bias=bias)), SRigLConfig(sparsity=0.8, seed=1)).eval()
    return masked, lower(masked, LlvmConfig(dense_fallback=False, progress=False))


def test_a_bias_converted_after_lowering_is_a_dtype_error():
    """A lowered layer whose bias alone was converted (``layer.bias = layer.bias.double()``) would have its float64
    bias read by the kernel as float32."""
    _, lowered = _linear()
    lowered[0].bias = lowered[0].bias.double()
    with torch.no_grad(), pytest.raises(KernelDtypeError, match="torch.float32 but the layer holds torch.float64"):
        lowered(torch.randn(5, 48))


def test_a_bias_given_to_a_kernel_built_without_one_is_refused():
    from srigl_compile.runtime.linear_op import condensed_linear

    _, lowered = _linear(bias=False)
    layer = lowered[0]
    with torch.no_grad(), pytest.raises(ValueError, match="has_bias=False, got bias=a tensor"):
        condensed_linear(torch.randn(5, 48), layer.values, layer.indices, torch.ones(layer.values.shape[0]),
                         layer.kernel_key)


def test_a_residual_given_to_a_kernel_without_an_add_epilogue_is_refused():
    from srigl_compile.runtime.linear_op import condensed_linear

    _, lowered = _linear()
    layer = lowered[0]
    with torch.no_grad(), pytest.raises(ValueError, match="got residual=a tensor"):
        condensed_linear(torch.randn(5, 48), layer.values, layer.indices, layer.bias, layer.kernel_key, 0,
                         torch.randn(5, layer.values.shape[0]))


def test_a_residual_only_the_output_broadcasts_up_to_is_refused():
    assert broadcasts_to((2, 4), (1, 4)) is False
    with pytest.raises(KernelShapeError, match="does not broadcast"):
        check_residual_shape(torch.zeros(2, 4), (1, 4), "layer")


def test_a_loaded_library_for_a_cpu_with_instructions_this_one_lacks_refuses_to_run():
    """Loaded kernels (``library_path`` set) are the ones that come from another machine."""
    handle = types.SimpleNamespace(key="k", missing_features=("avx512f",), target={"mcpu": "skylake-avx512"},
                                   library_path="/saved/kernels/abc.so")
    with pytest.raises(KernelDeviceError, match="crash the process"):
        check_runs_here(handle)


def test_a_column_equal_to_the_input_width_is_refused():
    """[0, n_in): the column n_in itself is one past the input row."""
    _, lowered = _linear()
    state = {key: tensor.clone() for key, tensor in lowered.state_dict().items()}
    state["0.indices"].view(-1)[0] = 48
    x = torch.randn(1, 48)
    with torch.no_grad():
        lowered(x)
        with pytest.raises(LayerError, match=r"hold columns in \[\d+, 48\], outside the kernel's \[0, 48\)"):
            lowered.load_state_dict(state)
        lowered[0].indices.view(-1)[0] = 48  # (written in place: refused at the next call)
        with pytest.raises(LayerError, match=r"outside the kernel's \[0, 48\)"):
            lowered(x)


def test_a_residual_autograd_tracks_is_refused_naming_it():
    from tests.codegen.dense_forms import sparse_model

    lowered = lower(sparse_model(0.9), progress=False)
    conv2 = lowered.block.conv2
    assert conv2.fused_epilogue and "add" in conv2.epilogue
    y = torch.randn(1, 16, 10, 10)
    residual = torch.randn(1, 16, 5, 5, requires_grad=True)
    with pytest.raises(InferenceOnlyError, match="autograd tracks the residual"):
        conv2(y, residual)


def test_a_non_leaf_input_autograd_tracks_is_refused_by_the_op():
    from srigl_compile.runtime.linear_op import condensed_linear

    _, lowered = _linear()
    layer = lowered[0]
    x = torch.randn(5, 48, requires_grad=True) * 2  # (an upstream layer's output: not a leaf)
    with pytest.raises(InferenceOnlyError, match="requires grad"):
        condensed_linear(x, layer.values, layer.indices, layer.bias, layer.kernel_key)


def test_weight_stand_ins_answer_their_own_device():
    cpu = WeightStandIn.make((4, 8), torch.float32, torch.device("cpu"))
    cuda = WeightStandIn.make((4, 8), torch.float32, torch.device("cuda", 0))
    assert cpu.device == torch.device("cpu") and cuda.device == torch.device("cuda", 0)


def test_a_residual_autograd_tracks_is_refused_by_the_op():
    gen = torch.Generator().manual_seed(0)
    indices = torch.rand(24, 20, generator=gen).argsort(dim=1)[:, :5].sort(dim=1).values
    layer = CondensedLinear(20, 24, torch.arange(24), torch.randn(24, 5, generator=gen), indices, None)
    layer.set_epilogue_("add")
    lowered = lower(WithResidual(layer), example_inputs=(torch.randn(4, 20), torch.randn(4, 24)), progress=False).layer
    assert lowered.fused_epilogue
    x = torch.randn(4, 20)
    residual = torch.randn(4, 24, requires_grad=True) * 2  # (an upstream layer's output: not a leaf)
    with pytest.raises(InferenceOnlyError, match="requires grad"):
        condensed_linear(x, lowered.values, lowered.indices, lowered.bias, lowered.kernel_key, 0, residual)


@pytest.mark.parametrize("rows", [8, 64])  # the mid kernel, the col kernel: both read the blocked weights
def test_blocked_weights_follow_values_changed_in_place(rows):
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40, bias=False)), SRigLConfig(sparsity=0.8, seed=1)).eval()
    layer = lower(masked, LlvmConfig(dense_fallback=False, progress=False))[0]
    x = torch.randn(rows, 48)
    with torch.no_grad():
        before = condensed_linear(x, layer.values, layer.indices, None, layer.kernel_key)
        layer.values.mul_(2)  # (as load_state_dict writes a layer's values: in place)
        after = condensed_linear(x, layer.values, layer.indices, None, layer.kernel_key)
    torch.testing.assert_close(after, 2 * before)


def test_row_kernel_shortcut_reads_non_contiguous_rows_as_they_are():
    """A lowered layer's 1-2 row shortcut (``RowCall``) takes contiguous rows only; others take the full path."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40)), SRigLConfig(sparsity=0.8, seed=1)).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False))
    rows = torch.randn(48, 2).t()  # two rows, 1 float apart within a row: not contiguous
    with torch.no_grad():
        lowered(rows.contiguous())  # (a first full call sets the shortcut up)
        assert lowered[0].__dict__.get("_row_call")
        torch.testing.assert_close(lowered(rows), masked(rows), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lowered(rows), lowered(rows.contiguous()))


def test_a_forced_col_threshold_picks_the_kernel(monkeypatch):
    """``col_threshold`` > 0 forces the col kernel from that many rows on (0: the handle's own threshold)."""
    from srigl_compile.runtime.registry import get_handle

    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40)), SRigLConfig(sparsity=0.8, seed=1)).eval()
    layer = lower(masked, LlvmConfig(dense_fallback=False, progress=False))[0]
    handle = get_handle(layer.kernel_key)
    ran = []
    for name in ("col_fn", "mid_fn"):
        fn = getattr(handle, name)
        monkeypatch.setattr(handle, name, lambda *args, _fn=fn, _name=name: (ran.append(_name), _fn(*args))[1])
    x = torch.randn(8, 48)
    with torch.no_grad():
        want = condensed_linear(x, layer.values, layer.indices, layer.bias, layer.kernel_key, 0)
        assert ran == ["mid_fn"]  # (8 rows: below the handle's threshold)
        got = condensed_linear(x, layer.values, layer.indices, layer.bias, layer.kernel_key, 4)
        assert ran == ["mid_fn", "col_fn"]
        condensed_linear(x, layer.values, layer.indices, layer.bias, layer.kernel_key, 100)
        assert ran == ["mid_fn", "col_fn", "mid_fn"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
