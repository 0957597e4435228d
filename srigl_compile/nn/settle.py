"""``settle(model, x)``: the warm-up that makes a lowered model's measured decisions for an input shape, as a server
would at start-up and as the benchmarks do before timing.

1. Near-dense layers' dense-form trials run to their end, and the dense paths they chose are kept only if whole
   forwards run faster with them (``dense_fallback.settle_trials``).
2. Stacks of convolutions that may run a batch in chunks get the chunk size whole forwards measured fastest, or
   whole batches (``batch_chunks.choose_batch_chunks``).

Until then a new shape's calls run both paths of each trial (up to twice as long) and whole batches. Decisions are
per input shape and kept by ``save_lowered`` for this machine.

Example:
    >>> lowered = lower(model)                                              # doctest: +SKIP
    >>> settle(lowered, torch.randn(64, 3, 224, 224))                       # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .batch_chunks import choose_batch_chunks
from .dense_fallback import settle_trials

__all__ = ["settle"]


def settle(model: torch.nn.Module, *args, **kwargs) -> int:
    """Call ``model(*args, **kwargs)`` (without gradients) until every decision for these inputs' shapes is
    measured (module docstring). Returns the calls made (1 for a model with nothing to decide after one call: no
    dense forms nor chunked stacks, or every shape decided before)."""
    calls = settle_trials(model, *args, **kwargs)  # (these calls also show the stacks their input shapes)
    return calls + choose_batch_chunks(model, settle_trials, *args, **kwargs)
