"""What the CPU rules and tuning choose: the fastest variant kept, a stored record the rule now declines
falling back to the default, defaults that fit, offset sharing as its formula says. Each test failed on a mutant
the rest of the suite let through (mutation probe, session 43)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")

from srigl_compile.codegen import tuning  # noqa: E402
from srigl_compile.codegen.cpu_target import host_llvm_target  # noqa: E402
from srigl_compile.codegen.rules import RowParams, RowRule  # noqa: E402
from srigl_compile.codegen.tuning import TuningRecords, select_params, tune_layout  # noqa: E402
from srigl_compile.runtime.spec import KernelSpec, target_key  # noqa: E402


def test_tuning_keeps_the_fastest_variant(monkeypatch):
    """With measured times given, the variant returned is the one with the smallest median, whatever its
    place in the space."""
    target = host_llvm_target()
    shape = KernelSpec(48, 96, 16, "int16", True)
    space = [RowParams(8, 16, 4), RowParams(16, 32, 16), RowParams(8, 64, 16)]
    times = {space[0]: 30.0, space[1]: 10.0, space[2]: 20.0}
    monkeypatch.setattr(tuning, "_measure_us", lambda spec, layout, params, target, repeat: times[params])
    best, best_us, candidates = tune_layout(shape, "row", target, space=space, progress=False)
    assert (best, best_us) == (space[1], 10.0)
    assert [c["median_us"] for c in candidates] == [30.0, 10.0, 20.0]


def test_a_stored_record_the_rule_now_declines_falls_back_to_the_default(tmp_path):
    """A record naming a variant that does not fit the shape (vec 16 does not divide k = 8) is not used:
    the default variant is, instead of a kernel that cannot be scheduled."""
    target = host_llvm_target()
    shape = KernelSpec(48, 96, 8, "int16", True)
    key = shape.record_key("row", target_key(target))
    TuningRecords(tmp_path).put(key, RowParams(16, 32, 16), 1.0, [])
    assert TuningRecords(tmp_path).get(key, "row") == RowParams(16, 32, 16)
    assert select_params(shape, "row", target, cache_dir=tmp_path) == RowRule().default(shape.k_pad)


def test_the_col_rule_s_default_fits_an_odd_k():
    """The default variant works for every k (module docstring: the k-inner width falls back to 8, 4, 2 or
    1): a col kernel blocked for k = 13 is scheduled with its default, kin = 1."""
    from srigl_compile.codegen.kernels import col_kernel
    from srigl_compile.codegen.rules import ColParams, ColRule

    target = {"kind": "llvm"}
    assert ColRule().default(13, target) == ColParams(rows=32, kin=1)
    assert ColRule().apply(col_kernel(8, 16, 13, "int32", 64, block=(32, 1)), target) is not None


def test_the_offset_rule_declines_interleaved_rows_that_split_a_group_sharing_offsets():
    """With rows sharing offsets in groups of 4, rin = 2 would split each group (one offset load per half
    group): the rule declines that variant, and takes rin = 4."""
    from srigl_compile.codegen.kernels import offset_kernel
    from srigl_compile.codegen.rules import ColParams, OffsetRule

    func = offset_kernel(64, 64, 64, True, "k", 32, 8, "relu", share=4)
    assert OffsetRule().apply(func, {"kind": "llvm"}, ColParams(rows=32, kin=8, rin=2, lanes=64, share=4)) is None
    assert OffsetRule().apply(func, {"kind": "llvm"}, ColParams(rows=32, kin=8, rin=4, lanes=64, share=4)) is not None


def test_offset_sharing_follows_the_union_of_share_rows():
    """SHARE (4) rows of density 55/64 read 64 (1 - (9/64)^4) ~ 63.97 inputs together, more than 1.15 k =
    63.25: no sharing (a 2-row union, 62.7, would pass); at 61/64 they share."""
    from srigl_compile.codegen.rules import offset_share

    assert offset_share(64, 55) == 1
    assert offset_share(64, 61) == 4
