"""BatchChunksPass: sequences of lowered convolutions that compute each image alone may run a batch in chunks.

Contract.
    requires: after CompileKernelsPass and the glue passes (the modules they leave are what is judged).
    ensures:  each outermost nn.Sequential that holds at least ``MIN_CONVOLUTIONS`` lowered convolutions and is
              ``nn.batch_chunks.per_sample`` is a ``ChunkedSequential`` with nothing measured (whole batches until
              ``settle`` measures a shape); nothing else changes.
    preserves: GRAPH, OUTPUT_SHAPES (a module's class changes, not its children or what it computes).
"""

from __future__ import annotations

import torch.nn as nn

from ..nn.batch_chunks import ChunkedSequential, per_sample
from ..nn.lowered import LoweredConv
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult

__all__ = ["BatchChunksPass", "MIN_CONVOLUTIONS"]

MIN_CONVOLUTIONS = 2  # a lone convolution has no activations to keep in cache for the next layer


def _stacks(module: nn.Module) -> list[nn.Sequential]:
    """The outermost per-sample nn.Sequentials under ``module`` (itself included) holding enough convolutions."""
    if type(module) is nn.Sequential and per_sample(module) and sum(
            isinstance(m, LoweredConv) for m in module.modules()) >= MIN_CONVOLUTIONS:
        return [module]
    return [stack for child in module.children() for stack in _stacks(child)]


class BatchChunksPass(Pass):
    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        stacks = _stacks(model)
        for stack in stacks:
            ChunkedSequential.convert(stack)
        return PassResult(model, modified=bool(stacks))
