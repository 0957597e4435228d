"""The col rule's blocked kernels: what a variant must match to be scheduled, a partial last row block, and the
blocked copy of each layer's weights that the handle keeps."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")

from srigl_compile.codegen.backends.llvm import build_condensed_linear  # noqa: E402
from srigl_compile.codegen.cpu_target import host_llvm_target  # noqa: E402
from srigl_compile.codegen.kernels import col_kernel, row_kernel  # noqa: E402
from srigl_compile.codegen.rules import ColParams, ColRule, RowParams, RowRule, schedule  # noqa: E402
from srigl_compile.codegen.tuning import select_params  # noqa: E402
from srigl_compile.runtime.spec import KernelSpec  # noqa: E402
from tests.helpers import make_layer, reference  # noqa: E402


def test_rules_decline_what_they_do_not_schedule():
    target = host_llvm_target()
    row, col = row_kernel(8, 16, 14, "int32"), col_kernel(8, 16, 16, "int32", 32, block=(32, 8))
    assert RowRule().apply(col, target) is None and ColRule().apply(row, target) is None
    assert RowRule().apply(row, target, RowParams(vec=8)) is None, "vec 8 does not divide k = 14"
    assert ColRule().apply(col, target, ColParams(rows=32, rin=3, lanes=32)) is None, "rin must divide rows"
    assert ColRule().apply(col, target, ColParams(rows=32, kin=8, lanes=32)) is not None
    for other in (ColParams(rows=64, kin=8, lanes=32), ColParams(rows=32, kin=4, lanes=32), ColParams(rows=32, kin=8)):
        assert ColRule().apply(col, target, other) is None, f"the blocked kernel was defined for another {other}"
    with pytest.raises(ValueError, match="k_tile dividing k"):
        col_kernel(8, 16, 13, "int32", 32, block=(32, 8))
    assert RowRule().apply(row, {"kind": "cuda"}) is None
    assert RowRule().apply(row, target) is not None, "the default variant fits any k"
    with pytest.raises(ValueError, match="no schedule rule"):
        schedule(row, [ColRule()])


def test_the_col_rule_s_default_row_chunk_is_the_target_s():
    """64 output rows a task where measured better (AVX-512), 32 elsewhere; the selected default follows."""
    assert ColRule().default(80, {"kind": "llvm", "mcpu": "skylake-avx512"}).rows == 64
    assert ColRule().default(80, {"kind": "llvm", "mcpu": "znver3"}).rows == 32
    assert ColRule().default(80).rows == 32
    spec = KernelSpec(64, 100, 13, "int32", True)
    target = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
    assert select_params(spec, "col", target, cache_dir="/nonexistent-records").rows == 64


@pytest.mark.parametrize("rin", [1, 2])
def test_blocked_col_kernel_with_a_partial_last_row_block(rin):
    """10 rows in blocks of 4: the last block's two zero rows are computed and not written back."""
    from srigl_compile.runtime.spec import block_rows

    target = host_llvm_target()
    values, indices, bias = make_layer(10, 16, 8, "int32", True)
    func = col_kernel(10, 16, 8, "int32", 32, block=(4, 4), epilogue="relu")
    executable = tvm.compile(ColRule().apply(func, target, ColParams(rows=4, kin=4, rin=rin, lanes=32)).mod,
                             target=tvm.target.Target(target))
    x = torch.randn(64, 16)
    tiles = x.view(2, 32, 16).transpose(1, 2).contiguous()
    y = torch.full((2, 32, 10), float("nan"))
    executable.mod["srigl_condensed_col"](tiles, block_rows(values, 4, 4), block_rows(indices, 4, 4), bias, y)
    expected = reference(x, values, indices, bias).relu()
    torch.testing.assert_close(y.view(64, 10), expected, rtol=1e-4, atol=1e-4)


def test_blocked_weights_are_kept_per_layer_and_made_again_when_they_change():
    """The tiled kernels read a blocked copy of each layer's weights: one per layer (layers of a shape share the
    handle), reused while the layer's tensors are unchanged, and made again after an in-place change of its values
    or indices or when the layer is given other indices; a stale copy would give the old layer's outputs."""
    handle = build_condensed_linear(70, 100, 13, "int16", True)
    layers = [make_layer(70, 100, 13, "int16", True, seed=seed) for seed in (0, 1)]
    operands = [[*handle.pack(values, indices), bias] for values, indices, bias in layers]
    x = torch.randn(150, 100)  # 2 full 64-lane tiles and a mid-kernel tail

    def check(ops, values, indices, bias):
        for rows in (x, x[:20]):  # col (+ mid tail) and mid alone
            torch.testing.assert_close(handle.launch(rows, ops, 0), reference(rows, values, indices, bias),
                                       rtol=1e-4, atol=1e-4)

    for _ in range(2):
        for ops, layer in zip(operands, layers):
            check(ops, *layer)
    first = handle.tiled_operands(operands[0])
    assert all(a is b for a, b in zip(first, handle.tiled_operands(operands[0]))), "made again for the same weights"
    assert first[0].shape == (-(-70 // handle.col_params.rows), handle.k_pad // handle.col_params.kin,
                              handle.col_params.rows, handle.col_params.kin)
    values, indices, bias = layers[0]
    other = make_layer(70, 100, 13, "int16", True, seed=2)[1]
    operands[0][1] = handle.pack(values, other)[1]  # another indices tensor (same version) beside the same values
    check(operands[0], values, other, bias)
    values.mul_(-2)
    operands[0][0].mul_(-2)  # in place: the same tensor, a new version
    check(operands[0], values, other, bias)
    operands[0][1].copy_(handle.pack(values, indices)[1])
    check(operands[0], values, indices, bias)
    check(operands[1], *layers[1])
