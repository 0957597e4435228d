"""The quick layer benchmark behind ``srigl-compile bench`` (``benchmarks/run.py`` is the full suite)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import SRigLConfig
from ..passes.lower import lower
from ..passes.sparsify import sparsify
from .timing import median_us


def run_quick_bench(sparsity: float, batches: list[int], threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(3072, 768)), SRigLConfig(sparsity=sparsity, distribution="uniform"))
    masked.eval()
    lowered = lower(masked, progress=False)
    csr, bias = masked[0].weight.detach().to_sparse_csr(), masked[0].bias.detach()
    yield f"3072->768 at {sparsity:.0%} sparsity, {threads} threads, median us per call"
    yield f"{'batch':>6} {'dense':>10} {'csr':>10} {'lowered':>10} {'x dense':>8}"
    for batch in batches:
        x = torch.randn(batch, 3072)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
            dense = median_us(lambda: masked(x), threads)
            sparse = median_us(lambda: torch.sparse.mm(csr, x.t()).t() + bias, threads)
            fast = median_us(lambda: lowered(x), threads)
        yield f"{batch:>6} {dense:>10.1f} {sparse:>10.1f} {fast:>10.1f} {dense / fast:>7.2f}x"
