"""LlvmLinearHandle: the fused kernel from ``FUSED_TILES_PER_THREAD`` full tiles a thread (a ragged tail too),
blocked operands made again when the layer's operands change in place or are replaced, and a RowCall refusing
operands other than those checked; every output against the gather reference (tests.helpers.reference, float64).
(Which kernel runs for each batch size: tests/codegen/test_lowered_calls.py.)"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.tvm

pytest.importorskip("tvm")

from srigl_compile.codegen.backends.llvm import build_condensed_linear  # noqa: E402
from srigl_compile.runtime.llvm_linear import FUSED_TILES_PER_THREAD, LlvmLinearHandle  # noqa: E402
from tests.helpers import make_layer, reference  # noqa: E402

SHAPE = (16, 24, 5, "int32", True)  # (n_out, n_in, k, index dtype, bias): small, so the kernels build fast
KERNELS = ("row_fn", "mid_fn", "col_fn", "fused_fn")


@pytest.fixture(scope="module")
def layer():
    handle = build_condensed_linear(*SHAPE)
    values, indices, bias = make_layer(*SHAPE)
    return handle, values, indices, bias


def _expected(x, values, indices, bias):
    return reference(x.double(), values.double(), indices, bias.double()).float()


@pytest.fixture
def ran(layer, monkeypatch):
    """The kernels each launch runs, in order (the real kernels still compute the output)."""
    handle = layer[0]
    seen = []
    for name in KERNELS:
        real = getattr(handle, name)
        monkeypatch.setattr(handle, name, lambda *args, real=real, name=name: seen.append(name[:-3]) or real(*args))
    return seen


def _launch(handle, values, indices, bias, m, threshold, seed=0):
    x = torch.randn(m, handle.n_in, generator=torch.Generator().manual_seed(seed))
    y = handle.launch(x, [*handle.pack(values, indices), bias], threshold)
    torch.testing.assert_close(y, _expected(x, values, indices, bias), rtol=1e-5, atol=1e-5)
    assert y.shape == (m, handle.n_out) and y.is_contiguous()


@pytest.mark.parametrize("tiles, tail, kernels", [(1, 0, ["col"]), (2, 0, ["fused"]), (2, 40, ["fused"])])
def test_the_fused_kernel_runs_from_its_tile_count(layer, ran, monkeypatch, tiles, tail, kernels):
    handle, values, indices, bias = layer
    monkeypatch.setattr(handle, "fused_from_tiles", 2)
    _launch(handle, values, indices, bias, handle.lanes * tiles + tail, 1)
    assert ran == kernels


def test_the_fused_kernel_s_tile_count_is_per_thread(layer, monkeypatch):
    """Mutant: FUSED_TILES_PER_THREAD and the thread count were added, not multiplied."""
    handle = layer[0]
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    again = LlvmLinearHandle(handle.key, handle.spec, handle.target, handle.row_params, handle.col_params,
                             handle.module)
    assert again.fused_from_tiles == 3 * FUSED_TILES_PER_THREAD


@pytest.mark.parametrize("m", [20, 64])  # mid and col kernels: the blocked copies of the operands
def test_operands_changed_in_place_or_replaced_are_blocked_again(layer, m):
    """Mutants: the blocked copy was kept after an in-place change of the values, or after the indices tensor
    was replaced under the same values tensor."""
    handle, values, indices, bias = layer
    packed_values, packed_indices = handle.pack(values, indices)
    x = torch.randn(m, handle.n_in)
    first = handle.launch(x, [packed_values, packed_indices, bias], 1 if m == 64 else 0)
    torch.testing.assert_close(first, _expected(x, values, indices, bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        packed_values.mul_(-2.0)  # in place: the same tensor, a new version
    again = handle.launch(x, [packed_values, packed_indices, bias], 1 if m == 64 else 0)
    torch.testing.assert_close(again, _expected(x, values * -2.0, indices, bias), rtol=1e-5, atol=1e-5)
    _, other = make_layer(*SHAPE, seed=1)[:2]
    other_values, other_indices = handle.pack(values * -2.0, other)
    assert torch.equal(other_values, packed_values)  # (only the indices differ)
    moved = handle.launch(x, [packed_values, other_indices, bias], 1 if m == 64 else 0)
    torch.testing.assert_close(moved, _expected(x, values * -2.0, other, bias), rtol=1e-5, atol=1e-5)


def test_a_row_call_refuses_operands_other_than_those_checked(layer):
    """Mutant: a RowCall ran on replaced values with the values it was made for."""
    handle, values, indices, bias = layer
    packed_values, packed_indices = handle.pack(values, indices)
    call = handle.verified_row_call(packed_values, packed_indices, bias)
    assert call is not None
    x = torch.randn(2, handle.n_in)
    torch.testing.assert_close(call(x, packed_values, packed_indices, bias), _expected(x, values, indices, bias),
                               rtol=1e-5, atol=1e-5)
    for replaced in ((packed_values * 2, packed_indices, bias), (packed_values, packed_indices.clone(), bias),
                     (packed_values, packed_indices, bias * 2)):
        assert call(x, *replaced) is None
