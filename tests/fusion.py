"""What the epilogue-fusion tests share (test modules never import each other): a small model condensed as
``lower`` would before fusing, and the pass run with llvm's epilogues, its outputs checked unchanged."""

from __future__ import annotations

import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.codegen.backends.llvm import LlvmBackend
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fuse_epilogue import FuseEpiloguePass
from srigl_compile.passes.lower import PadAblatedRowsPass
from srigl_compile.passes.manager import PassManager

LLVM = LlvmBackend.epilogues  # (a class attribute: no TVM import)


def condensed(model: nn.Module, example=None, seed: int = 0) -> nn.Module:
    """``model`` sparsified at 50% (uniform, no ablation), condensed and padded as ``lower`` runs it, in eval."""
    torch.manual_seed(seed)
    masked = sparsify(model, SRigLConfig(sparsity=0.5, distribution="uniform", ablation=False),
                      example_inputs=example)
    return PassManager([PadAblatedRowsPass()]).run(condense(masked, example_inputs=example)).eval()


def fused_unchanged(model: nn.Module, x: torch.Tensor) -> tuple[FuseEpiloguePass, nn.Module]:
    """(the pass, the model it returns) with llvm's epilogues; outputs unchanged bit for bit (condensed layers
    compute an activation they take with torch's own function)."""
    with torch.no_grad():
        before = model(x)
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model).module
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before, rtol=0, atol=0)
    return fuse, fused
