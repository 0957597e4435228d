"""LlvmConvHandle.offsets: a layer's offsets are cached per image size and computed again when its columns change
in place (same tensor, new version); outputs against the masked model (kernels only, no dense forms)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig

pytestmark = pytest.mark.tvm


def _block(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    masked = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform", ablation=False, seed=seed)).eval()
    return masked, lower(masked, LlvmConfig(dense_fallback=False, progress=False))


@pytest.fixture(scope="module")
def blocks():
    return _block(0), _block(1)


def test_columns_changed_in_place_get_offsets_of_their_own(blocks):
    """Mutant: the offsets cache ignored the columns' version, so a layer whose operands were copied over in place
    kept reading the old columns' positions."""
    (masked, lowered), (other_masked, other) = blocks
    assert [m.kernel_key for m in lowered] == [m.kernel_key for m in other]
    assert not all(torch.equal(a.indices, b.indices) for a, b in zip(lowered, other))  # (the case under test)
    with torch.no_grad():
        for shape in ((2, 6, 9, 11), (1, 6, 5, 7)):  # offsets cached for two sizes
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(lowered, other):  # another model's operands, copied in place
            for name in ("values", "indices", "bias"):
                getattr(mine, name).copy_(getattr(theirs, name))
        for shape in ((2, 6, 9, 11), (1, 6, 5, 7)):
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), other_masked(x), rtol=1e-5, atol=1e-5)


def test_each_image_size_reads_at_its_own_row_pitch(blocks):
    """Mutant: the offsets cache ignored the row pitch, so an image size with the same padded rows and channel
    stride (planes rounded up to whole vectors) but another width reused offsets of the wrong pitch."""
    _, (masked, lowered) = blocks
    with torch.no_grad():
        for height in (4, 6):
            for width in range(5, 21):  # consecutive widths: pitches one apart, planes often rounded alike
                x = torch.randn(1, 6, height, width)
                torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
