"""A CPU graph of a lowered encoder layer, whose linear2 adds its residual (the feed-forward block's input) in the
kernel: the recording writes the output over that dead residual where the output is laid out as the residual
(row kernel, whole 8-row mid tiles, whole col / fused tiles) and never where the kernel's output has padding
rows (a ragged tail); replays equal the eager forward bit for bit, and the eager forward equals the masked model."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, cpu_graph, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.lowered import LoweredLinear
from srigl_compile.runtime.registry import get_handle
from tests.helpers import kernel_calls_writing_over

pytestmark = pytest.mark.tvm

WIDTH = 32


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 8, WIDTH)
    masked = sparsify(layer, SRigLConfig(sparsity=0.7, distribution="uniform"), example_inputs=(x,)).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    assert lowered.linear2.epilogue == "add" and lowered.linear2.fused_epilogue  # (the case under test)
    return masked, lowered


# rows (tokens of one sequence): 2 row kernel; 8 / 16 whole mid tiles; 5 / 13 a ragged mid tile; 51 col with a
# ragged tile; 64 one whole col tile; with the fused kernel from one tile: 69 ragged, 128 whole
@pytest.mark.parametrize("rows, fused, over", [(2, False, True), (8, False, True), (16, False, True),
                                               (5, False, False), (13, False, False), (51, False, False),
                                               (64, False, True), (69, True, False), (128, True, True)])
def test_the_residual_is_written_over_only_where_the_output_has_its_layout(encoder, monkeypatch, rows, fused, over):
    """Mutants: the mid, col and fused paths wrote over a residual of fewer rows than the tiles they write (an
    error, or rows past the residual); the row kernel never wrote over one."""
    masked, lowered = encoder
    handles = {get_handle(m.kernel_key) for m in lowered.modules() if isinstance(m, LoweredLinear)}
    for handle in handles:
        monkeypatch.setattr(handle, "col_threshold", 49)
        monkeypatch.setattr(handle, "fused_from_tiles", 1 if fused else 10**6)
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(1, rows, WIDTH, generator=torch.Generator().manual_seed(seed))
            before = x.clone()
            eager = lowered(x)
            torch.testing.assert_close(eager, masked(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)
            assert torch.equal(x, before)
    (entry,) = graphed._entries.values()
    writes_over = kernel_calls_writing_over(entry.recording)
    assert bool(writes_over) == over, [call.kernel for call in writes_over]
