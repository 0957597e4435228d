"""The quick layer benchmark behind ``srigl-compile bench`` (``benchmarks/run.py`` is the full suite)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import SRigLConfig
from ..environment import environment, machine_line
from ..passes.lower import lower
from ..passes.sparsify import sparsify
from ..sparsity import layer_budget
from .timing import median_us

N_IN, N_OUT = 3072, 768  # the paper's layer


def largest_sparsity(sparsity: float) -> float | None:
    """None where ``sparsity`` leaves each of the layer's neurons at least one input (k >= 1, as ``sparsify``
    budgets a uniform layer), else the largest sparsity that does, rounded down to 4 decimals."""
    if layer_budget(N_IN * N_OUT, 1 - sparsity) >= N_OUT:
        return None
    return math.floor((1 - 1 / N_IN) * 1e4) / 1e4  # (one input per neuron: density 1 / N_IN)


def run_quick_bench(sparsity: float, batches: list[int], threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(N_IN, N_OUT)), SRigLConfig(sparsity=sparsity, distribution="uniform"))
    masked.eval()
    lowered = lower(masked, progress=False)
    csr, bias = masked[0].weight.detach().to_sparse_csr(), masked[0].bias.detach()
    yield f"3072->768 at {sparsity * 100:g}% sparsity, {threads} threads, median us per call"
    yield f"on {machine_line(environment())}"  # (what the figures depend on)
    yield f"{'batch':>6} {'dense':>10} {'csr':>10} {'lowered':>10} {'x dense':>8}"
    for batch in batches:
        x = torch.randn(batch, 3072)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
            dense = median_us(lambda: masked(x), threads)
            sparse = median_us(lambda: torch.sparse.mm(csr, x.t()).t() + bias, threads)
            fast = median_us(lambda: lowered(x), threads)
        yield f"{batch:>6} {dense:>10.1f} {sparse:>10.1f} {fast:>10.1f} {dense / fast:>7.2f}x"
