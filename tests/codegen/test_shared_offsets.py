"""Near-dense convolutions whose rows share offset lists (``ColParams.share``): the packing keeps every weight
where it was, the offset kernel loads each input vector once for a group of rows, outputs equal the masked model."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.codegen.kernels import offset_kernel
from srigl_compile.codegen.rules import SHARE, ColParams, OffsetRule, offset_share
from srigl_compile.runtime.registry import get_handle
from srigl_compile.runtime.spec import shared_columns


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), n_in=st.integers(1, 40), share=st.sampled_from([1, 2, 4]), data=st.data())
def test_shared_columns_keeps_every_weight_at_its_column(n, n_in, share, data):
    k = data.draw(st.integers(1, n_in))
    rows = share * data.draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    columns = torch.rand(n, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
    columns = torch.cat([columns, columns[:, -1:]], 1).to(torch.int16)  # pack's zero-weight padding repeats one
    values = torch.cat([torch.randn(n, k, generator=gen), torch.zeros(n, 1)], 1)
    spread, union = shared_columns(values, columns, share, rows, 8)
    padded = -(-n // rows) * rows
    assert spread.shape[0] == padded and union.shape == (padded // share, spread.shape[1])
    assert spread.shape[1] % 8 == 0 and bool((union[:, 1:] >= union[:, :-1]).all())
    rebuilt = torch.zeros(padded, n_in).scatter_add_(1, union.long().repeat_interleave(share, 0), spread)
    expected = torch.zeros(padded, n_in)
    expected[:n].scatter_add_(1, columns.long(), values)
    assert torch.equal(rebuilt, expected)


def test_sharing_is_chosen_for_near_dense_layers_only():
    assert offset_share(64, 61) == SHARE and offset_share(256, 245) == SHARE  # ResNet-50 stage 1 under ERK
    assert offset_share(256, 147) == 1 and offset_share(576, 104) == 1  # density 0.57 / 0.18


@pytest.mark.tvm
@pytest.mark.parametrize("conv, spatial", [(nn.Conv2d(64, 70, 1), (9, 9)), (nn.Conv2d(24, 40, 3, padding=1), (8, 7)),
                                           (nn.Conv2d(16, 36, 3, padding=2, dilation=2, bias=False), (11, 10)),
                                           (nn.Conv2d(32, 64, 1), (9, 9)),  # whole row blocks: row-stationary
                                           (nn.Conv2d(16, 32, 3, padding=1, bias=False), (8, 7))])
def test_near_dense_convolutions_share_offsets_and_equal_masked(conv, spatial, tmp_path):
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(conv, nn.ReLU()), SRigLConfig(sparsity=0.05, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    layer = lowered[0]
    assert get_handle(layer.kernel_key).params.share == SHARE and layer.indices.shape[2] * SHARE == 32
    assert layer.k == get_handle(layer.kernel_key).k_pad  # the layer's k, not its union's
    for batch in (1, 3):
        x = torch.randn(batch, conv.in_channels, *spatial)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
    save_lowered(lowered, tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(load_lowered(tmp_path / "model")(x), lowered(x))


@pytest.mark.tvm
@pytest.mark.parametrize("share, n_out", [(1, 64), (SHARE, 64), (SHARE, 40)])
def test_shared_rows_keep_their_accumulators_in_registers_over_the_whole_k(share, n_out):
    """Rows sharing offsets run group by group over all of k with a local (register) accumulator and write their
    rows back per group; rows with their own offsets, and a ragged last row block, keep the task's k-tile-outer
    nest and its workspace."""
    params = ColParams(rows=32, kin=8, rin=SHARE if share > 1 else 2, lanes=64, share=share)
    sch = OffsetRule().apply(offset_kernel(n_out, 64, 64, True, "k", 32, 8, "relu", share=share),
                             {"kind": "llvm"}, params)
    script = sch.mod.script()
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
    if share > 1 and n_out % 32 == 0:
        assert 'scope="local"' in script
        assert [int(loop.extent) for loop in loops[1:]] == [32 // SHARE, SHARE, 64]  # row group, its rows, lanes
    else:
        assert 'scope="local"' not in script and [int(loop.extent) for loop in loops[1:]] == [32, 64]
