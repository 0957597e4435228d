"""The models the GPU tests lower for CUDA. ``scripts/build_gpu_bundle.py`` lowers the same models here (same
seeds, same shapes) so that the GPU machine, which has only the TVM runtime, finds every kernel prebuilt."""

from __future__ import annotations

import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, sparsify
from tests.helpers import ablate, randomize_bn
from tests.models import ResidualCNN
from tests.models import condense_mlp as mlp

TARGET = {"kind": "cuda", "arch": "sm_90"}  # H100 and H200
DTYPES = (torch.float32, torch.float16)
BATCHES = (1, 3, 9, 20, 37, 256, 2048)  # decode (tiles 1, 4, 16; 2 launches at 20), col, expand + cuBLAS


def cases() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """name -> (masked model in eval mode, input shape without the batch)."""
    torch.manual_seed(0)
    uniform = dict(distribution="uniform", seed=3)
    paper = sparsify(nn.Sequential(nn.Linear(3072, 768)), SRigLConfig(sparsity=0.9, **uniform))
    k1 = sparsify(nn.Sequential(nn.Linear(64, 48, bias=False)), SRigLConfig(sparsity=63 / 64, **uniform))
    conv = sparsify(nn.Sequential(nn.Conv2d(64, 96, 3, padding=1)), SRigLConfig(sparsity=0.9, **uniform))
    pointwise = sparsify(nn.Sequential(nn.Conv2d(128, 64, 1, bias=False)), SRigLConfig(sparsity=0.9, **uniform))
    small_mlp = ablate(sparsify(mlp(), SRigLConfig(sparsity=0.8, seed=1)), {"0": [1, 5], "3": [2]}, {("0", 5): 0.4})
    cnn = sparsify(randomize_bn(ResidualCNN()), SRigLConfig(sparsity=0.8, seed=2))
    # 10 rows: the expand kernel's last block of rows (8 in fp16, 4 in fp32 at this width) is partly past n_out,
    # so its row guard is what keeps the scatter inside w and idx (compute-sanitizer checks it: gpu_check.sh)
    narrow = sparsify(nn.Sequential(nn.Linear(3072, 10)), SRigLConfig(sparsity=0.9, **uniform))
    built = {"linear_3072_768": (paper, (3072,)), "linear_k1_nobias": (k1, (64,)), "conv3x3": (conv, (64, 8, 8)),
             "conv1x1_nobias": (pointwise, (128, 7, 7)), "mlp_ablated": (small_mlp, (32,)),
             "residual_cnn": (cnn, (3, 16, 16)), "linear_3072_10": (narrow, (3072,))}
    return {name: (model.eval(), shape) for name, (model, shape) in built.items()}
