"""How a lowered layer's call reaches its kernel: the kernel each batch size runs, the operator under fx / export /
compile and opcheck, typed errors for bad inputs, the checked-operand fast path of small calls, and which compiled
variant a layer shape gets (tuning records, rules, a second variant in one process)."""


import pytest
import torch
import torch.nn as nn

from srigl_compile import (
    DeviceError,
    SRigLConfig,
    condense,
    load_lowered,
    lower,
    save_lowered,
    sparsify,
)
from srigl_compile.codegen.backends.llvm import LlvmConfig
from tests.helpers import assert_same

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("batch, kernel", [(1, "row"), (2, "row"), (3, "mid"), (48, "mid"), (49, "col"), (300, "col"),
                                           (197, "col mid"), (160, "col mid"), (128, "col")])
def test_each_batch_size_runs_its_kernel(lowered_mlp, batch, kernel, monkeypatch):
    """Row kernel for 1-2 rows, 8-lane mid kernel up to the threshold, 64-lane col kernel beyond; a ragged tail
    of at most half a tile (197 = 3 x 64 + 5; 160 = 2 x 64 + 32) runs on the mid kernel after the full tiles."""
    from srigl_compile.runtime.registry import get_handle

    masked, lowered = lowered_mlp
    handle = get_handle(lowered[0].kernel_key)
    calls = []
    for name in ("row", "mid", "col"):
        original = getattr(handle, f"{name}_fn")
        monkeypatch.setattr(handle, f"{name}_fn", lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    assert_same(lowered, masked, torch.randn(batch, 32))
    assert calls == kernel.split()


def test_leading_dims_and_empty_batch(lowered_mlp):
    masked, lowered = lowered_mlp
    assert_same(lowered, masked, torch.randn(2, 3, 5, 32))
    assert lowered(torch.randn(0, 32)).shape == (0, 8)


def test_custom_op_passes_opcheck(lowered_mlp):
    _, lowered = lowered_mlp
    layer = lowered[3]
    args = (layer.values, layer.indices, layer.bias, layer.kernel_key, layer.col_threshold)
    for batch in (1, 40):
        torch.library.opcheck(torch.ops.srigl_compile.tvm_condensed_linear.default,
                              (torch.randn(batch, layer.fan_in), *args))


def test_fx_export_and_compile_keep_the_op(lowered_mlp):
    masked, lowered = lowered_mlp
    x = torch.randn(4, 32)
    expected = masked.eval()(x)
    traced = torch.fx.symbolic_trace(lowered)
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(lowered, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any("srigl_compile.tvm_condensed_linear" in t for t in targets)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lowered, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(lowered_mlp):
    from srigl_compile.runtime.registry import get_handle

    _, lowered = lowered_mlp
    with pytest.raises(DeviceError, match="float32"):
        lowered(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(DeviceError, match="CPU"):
        get_handle(lowered[0].kernel_key).check_input(torch.empty(2, 32, device="meta"))
    from srigl_compile.runtime.checks import KernelShapeError

    with pytest.raises(KernelShapeError, match=r"lowered LoweredLinear '0' expects 32 input features.*\(2, 31\)"):
        lowered(torch.randn(2, 31))
    assert issubclass(KernelShapeError, ValueError)


def test_tuning_records_are_written_once_and_reused(tmp_path, monkeypatch):
    from srigl_compile.codegen import rules, tuning
    from srigl_compile.runtime import registry

    monkeypatch.setattr(rules.RowRule, "space", lambda self, k: [rules.RowParams(8, 8, 8), rules.RowParams(8, 16, 8)])
    monkeypatch.setattr(rules.ColRule, "space", lambda self, k: [rules.ColParams(32, 8, 1, 16),
                                                                 rules.ColParams(32, 8, 1, 32)])
    monkeypatch.setattr(registry, "_HANDLES", {})
    masked = sparsify(nn.Sequential(nn.Linear(48, 24)), SRigLConfig(sparsity=0.5, distribution="uniform"))
    lowered = lower(masked, tune=True, cache_dir=tmp_path, progress=False)
    records = list(tmp_path.rglob("*.json"))
    assert len(records) == 2, "one record per layout"
    calls = []
    monkeypatch.setattr(tuning, "tune_layout", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(registry, "_HANDLES", {})
    lower(masked, tune=True, cache_dir=tmp_path, progress=False)
    assert not calls, "a tuned shape is read from the records, not searched again"
    assert_same(lowered, masked, torch.randn(3, 48))


def test_schedule_rules_decline_what_they_do_not_apply_to():
    from srigl_compile.codegen.kernels import col_kernel, row_kernel
    from srigl_compile.codegen.rules import RULES, ColParams, RowParams, RowRule, schedule

    row, col = row_kernel(16, 32, 12, "int16"), col_kernel(16, 32, 12, "int16", 16, block=(16, 4))
    assert RowRule().apply(col, None, RowParams()) is None, "wrong layout"
    assert RowRule().apply(row, None, RowParams(vec=8)) is None, "k = 12 is not a multiple of 8"
    assert RowRule().apply(row, None, RowParams(vec=4)) is not None
    assert RowRule().apply(row, {"kind": "cuda"}, RowParams(vec=4)) is None, "not an llvm target"
    assert RULES["col"].apply(row, None, ColParams()) is None
    with pytest.raises(ValueError, match="no schedule rule"):
        schedule(row, list(RULES.values()), RowParams(vec=8))
    assert all(12 % p.vec == 0 for p in RowRule().space(12))


def _masked_with_tuned_variants(seed: int, sparsity: float, records):
    """A linear + conv model whose two shapes have tuning records in ``records`` naming variants other than the
    defaults."""
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.tuning import select_params
    from srigl_compile.nn.lowered import kernel_spec
    from srigl_compile.runtime.llvm_params import ColParams, RowParams

    torch.manual_seed(seed)
    masked = sparsify(nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Unflatten(1, (3, 4, 4)),
                                    nn.Conv2d(3, 8, 3, padding=1)),
                      SRigLConfig(sparsity=sparsity, distribution="uniform")).eval()
    target, condensed = host_llvm_target(), condense(masked)
    for layer, layout, variant in ((condensed[0], "row", RowParams(16, 32, 16)),
                                   (condensed[3], "offset", ColParams(16, 4, 1, 32))):
        spec = kernel_spec(layer, "direct")
        chosen = select_params(spec, layout, target, tune=True, cache_dir=records, space=[variant], progress=False)
        assert chosen == variant and chosen != select_params(spec, layout, target, cache_dir=records / "none")
    return masked


def test_a_shape_lowered_again_with_other_variants_leaves_the_first_model_working(tmp_path):
    masked = _masked_with_tuned_variants(0, 0.7, tmp_path / "records")
    first = lower(masked, cache_dir=tmp_path / "records", progress=False)
    second = lower(masked, cache_dir=tmp_path / "none", progress=False)  # default variants, same shapes
    assert first[0].kernel_key != second[0].kernel_key and second[0].kernel_key.endswith("#2")
    x = torch.randn(3, 40)
    with torch.no_grad():
        for lowered in (first, second):
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        save_lowered(second, tmp_path / "second")
        torch.testing.assert_close(load_lowered(tmp_path / "second")(x), second(x), rtol=0, atol=0)


def test_a_model_loaded_beside_another_variant_of_its_shapes_leaves_both_working(tmp_path):
    """Saved in one process with one variant of each shape, loaded in another that lowered the same shapes with
    other variants under the same keys: each model keeps running the kernels its operands were packed for."""
    from srigl_compile.runtime import registry

    masked = _masked_with_tuned_variants(2, 0.75, tmp_path / "records")
    x = torch.randn(3, 40)
    before = dict(registry._HANDLES)
    try:
        with torch.no_grad():
            registry._HANDLES.clear()  # (two processes in turn, each with only its own kernels)
            tuned = lower(masked, cache_dir=tmp_path / "records", progress=False)
            save_lowered(tuned, tmp_path / "tuned")
            keys = {tuned[0].kernel_key, tuned[3].kernel_key}
            registry._HANDLES.clear()  # the same shapes lowered in another with the default variants, same keys
            here = lower(masked, cache_dir=tmp_path / "none", progress=False)
            assert {here[0].kernel_key, here[3].kernel_key} == keys
            expected = here(x)
            loaded = load_lowered(tmp_path / "tuned")
            assert {loaded[0].kernel_key, loaded[3].kernel_key}.isdisjoint(keys)  # registered beside, renamed
            torch.testing.assert_close(here(x), expected, rtol=0, atol=0)
            x5 = torch.randn(5, 40)  # (a new shape: no call prepared before the load)
            torch.testing.assert_close(here(x5), masked(x5), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(x), masked(x), rtol=1e-5, atol=1e-5)
            again = load_lowered(tmp_path / "tuned")  # the same variant again: its handles are reused
            assert (again[0].kernel_key, again[3].kernel_key) == (loaded[0].kernel_key, loaded[3].kernel_key)
            torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)
    finally:
        registry._HANDLES.clear()
        registry._HANDLES.update(before)


@pytest.mark.parametrize("bias", [True, False])
def test_small_eager_calls_skip_the_checks_only_while_the_checked_operands_are_in_place(bias, tmp_path):
    from srigl_compile.errors import InferenceOnlyError
    from srigl_compile.runtime.checks import KernelDtypeError, KernelShapeError

    torch.manual_seed(1)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40, bias=bias)), SRigLConfig(sparsity=0.8)).eval()
    layer = lower(masked, LlvmConfig(dense_fallback=False, progress=False))[0]  # (the kernel's calls, compared exactly)
    x = torch.randn(2, 48)
    with torch.no_grad():
        full = layer(x)  # the first call takes the full path, with every check
        assert type(layer._row_call).__name__ == "RowCall"
        for rows in (x[:1], x, x.t().contiguous().t(), torch.randn(7, 48)):  # row kernel, strided rows, mid kernel
            torch.testing.assert_close(layer(rows), masked(rows), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), full, rtol=0, atol=0)
        with pytest.raises(KernelDtypeError):
            layer(x.double())
        with pytest.raises(KernelShapeError):
            layer(torch.randn(1, 47))
    with pytest.raises(InferenceOnlyError):
        layer(x.requires_grad_())
    with torch.no_grad():
        layer.values = layer.values * 2  # replaced operands: checked again, then the fast path on the new ones
        torch.testing.assert_close(layer(x[:1]), 2 * (full[:1] - (layer.bias if bias else 0)) +
                                   (layer.bias if bias else 0), rtol=1e-5, atol=1e-5)
        assert layer._row_call.values is layer.values
        # Replaced columns too (a mutant that watched only the values passed, 8.2 off); and at 7 rows, the
        # batch kernels' blocked copy of the weights follows an in-place change.
        own = lambda rows: (rows[:, layer.indices.long()] * layer.values).sum(-1) + (layer.bias if bias else 0)  # noqa: E731
        layer.indices = layer.indices.flip(1).contiguous()
        torch.testing.assert_close(layer(x[:1]), own(x[:1]), rtol=1e-5, atol=1e-5)
        assert layer._row_call.indices is layer.indices
        seven = torch.randn(7, 48)
        layer(seven)
        layer.values.mul_(-0.5)
        torch.testing.assert_close(layer(seven), own(seven), rtol=1e-5, atol=1e-5)
        layer.values = layer.values.double()
        with pytest.raises(KernelDtypeError):
            layer(x[:1])
    called = lower(masked, progress=False)
    with torch.no_grad():
        want = called(x[:1])
        assert called[0]._row_call is not None
        save_lowered(called, tmp_path / "m")  # a called model pickles without its fast path (compiled functions)
        torch.testing.assert_close(load_lowered(tmp_path / "m")(x[:1]), want, rtol=0, atol=0)
