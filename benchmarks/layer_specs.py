"""The layers the layer benchmark times, and the inputs they take (full run and quick mode).

    python benchmarks/run.py --only layers         # runs it (layers.py drives this module)
    from layer_specs import LAYERS, QUICK_LAYERS

Shapes: the SRigL paper's ViT-B/16 MLP layers, a 4096x4096 layer, and ResNet-50 layer4 convolutions on the 7x7
maps of a 224x224 input (no bias, as in ResNet).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

LINEAR_BATCHES = (1, 8, 64, 256, 2048)
CONV_BATCHES = (1, 32)
SPARSITIES = (0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer shape. Convolutions are square kernels on square ``size`` x ``size`` maps, same padding."""

    name: str
    title: str
    n_in: int
    n_out: int
    batches: tuple[int, ...]
    kernel: int = 0  # 0: a Linear layer
    size: int = 0
    bias: bool = True

    @property
    def is_conv(self) -> bool:
        return self.kernel > 0

    def make(self) -> nn.Module:
        if self.is_conv:
            return nn.Conv2d(self.n_in, self.n_out, self.kernel, padding=self.kernel // 2, bias=self.bias)
        return nn.Linear(self.n_in, self.n_out, bias=self.bias)

    def input(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (batch, self.n_in, self.size, self.size) if self.is_conv else (batch, self.n_in)
        return torch.randn(*shape, generator=generator)

    def fan_in(self) -> int:
        return self.n_in * self.kernel**2 if self.is_conv else self.n_in

    def rows(self, batch: int) -> int:
        """Rows of the matrix product the layer is: batch, or batch x positions for a convolution (im2col)."""
        return batch * self.size**2 if self.is_conv else batch


LAYERS = {spec.name: spec for spec in (
    LayerSpec("vit_fc1", "ViT-B/16 mlp fc1 768->3072", 768, 3072, LINEAR_BATCHES),
    LayerSpec("vit_fc2", "ViT-B/16 mlp fc2 3072->768 (the paper's layer)", 3072, 768, LINEAR_BATCHES),
    LayerSpec("linear4096", "4096->4096", 4096, 4096, LINEAR_BATCHES),
    LayerSpec("r50_conv1x1", "ResNet-50 layer4 1x1 2048->512, 7x7 maps", 2048, 512, CONV_BATCHES, 1, 7, False),
    LayerSpec("r50_conv3x3", "ResNet-50 layer4 3x3 512->512, 7x7 maps", 512, 512, CONV_BATCHES, 3, 7, False),
)}

# Quick mode: tiny shapes, batch 1 and an odd batch (the kernels' tails), one sparsity.
QUICK_LAYERS = {spec.name: spec for spec in (
    LayerSpec("tiny_linear", "tiny 48->32", 48, 32, (1, 13)),
    LayerSpec("tiny_conv3x3", "tiny 3x3 8->16, 5x5 maps", 8, 16, (1, 3), 3, 5, False),
)}
QUICK_SPARSITIES = (0.9,)
