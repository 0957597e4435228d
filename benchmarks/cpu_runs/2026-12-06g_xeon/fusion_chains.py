"""Epilogue chains FuseEpiloguePass finds in the zoo's ResNet-50 and ResNet-34 (90% sparse, 64x64 inputs).

    python benchmarks/cpu_runs/2026-12-06g_xeon/fusion_chains.py   (at a commit, or a worktree on PYTHONPATH)
"""

import collections

import torch

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.codegen.backends.llvm import LlvmBackend
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fold_batchnorm import fold_batchnorm
from srigl_compile.passes.fuse_epilogue import FuseEpiloguePass
from srigl_compile.passes.lower import PadAblatedRowsPass
from srigl_compile.passes.manager import PassManager
from srigl_compile.zoo import build_model

torch.manual_seed(0)
for name in ("resnet50", "resnet34"):
    x = torch.randn(1, 3, 64, 64)
    masked = sparsify(build_model(name, (3, 64, 64), 10).eval(), SRigLConfig(sparsity=0.9), example_inputs=(x,))
    condensed = PassManager([PadAblatedRowsPass()]).run(fold_batchnorm(condense(masked.eval(), example_inputs=(x,))))
    fuse = FuseEpiloguePass("direct", LlvmBackend.epilogues)
    fuse(condensed.eval())
    print(name, len(fuse.fused), collections.Counter(fuse.fused.values()))
