"""PassManager: run a pipeline's passes in order on one model with one shared ``Analyses`` (``passes/analysis.py``).

After a pass that modified the model, the analyses it does not list in ``Pass.preserves`` are dropped (recomputed
when next asked for); a pass returning a different module object drops them all (``Analyses`` belongs to one model
object).

Example:
    >>> from srigl_compile.passes.fold_batchnorm import FoldBatchNormPass
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> type(PassManager([FoldBatchNormPass()]).run(net)[1]).__name__
    'Identity'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.nn as nn

from .analysis import Analyses
from .base import Pass

__all__ = ["PassManager"]

log = logging.getLogger(__name__)


class PassManager:
    """Run passes in order on one model with shared analyses."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def run(self, model: nn.Module, analyses: Analyses | None = None) -> nn.Module:
        analyses = analyses if analyses is not None else Analyses()
        for p in self.passes:
            result = p(model, analyses)
            if result.modified:  # (a different module object starts afresh anyway: Analyses is per model object)
                analyses.invalidate(p.preserves)
            log.debug("%s: modified=%s, analyses kept: %s", type(p).__name__, result.modified, analyses.computed)
            model = result.module
        return model
