"""Only an adaptive average pool to 1 x 1 is a global average pool: one to 1 x 3 (or 3 x 1) keeps torch's pool
and the lowered model equals the masked one. Failed on a mutant the rest of the suite let through (mutation probe,
session 44)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.pooling import LoweredGlobalAvgPool2d, can_lower_global_avg_pool

pytestmark = pytest.mark.tvm

SIZES = [(1, 1), 1, (1, 3), (3, 1)]


class _Pools(nn.Module):
    """Two direct convolutions, then an adaptive average pool of each size in SIZES."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(size) for size in SIZES)

    def forward(self, x):
        h = self.features(x)
        return torch.cat([pool(h).flatten(1) for pool in self.pools], 1)


@pytest.fixture(scope="module")
def pools():
    torch.manual_seed(0)
    masked = sparsify(_Pools(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    return masked, lower(masked, progress=False)


@pytest.mark.parametrize("index, global_pool", [(0, True), (1, True), (2, False), (3, False)])
def test_only_a_pool_to_one_by_one_is_lowered_as_a_global_pool(pools, index, global_pool):
    masked, lowered = pools
    size = SIZES[index]
    assert can_lower_global_avg_pool(nn.AdaptiveAvgPool2d(size)) == global_pool
    assert type(lowered.pools[index]) is (LoweredGlobalAvgPool2d if global_pool else nn.AdaptiveAvgPool2d)
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        h = masked.features(x)
        want = nn.functional.adaptive_avg_pool2d(h, size)
        assert want.shape[-2:] == torch.Size(size if isinstance(size, tuple) else (size, size))
        torch.testing.assert_close(lowered.pools[index](h), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
