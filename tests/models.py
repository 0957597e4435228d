"""The test models and builders shared by several test modules (one place, so test modules never import
each other)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import (
    SRigLConfig,
    sparsify,
)
from tests.helpers import ablate, randomize_bn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def updater_mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def make_data(model_kind, seed, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g) if model_kind == "cnn" else torch.randn(n, 20, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


def condense_mlp(bias=True):
    return nn.Sequential(nn.Linear(32, 64, bias=bias), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 48, bias=bias),
                         nn.GELU(), nn.Linear(48, 8, bias=bias))


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.bn1 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.spatial = nn.Conv2d(16, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(24)
        self.mix = nn.Conv2d(24, 24, 3, padding=1)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = h + self.bn2(self.project(F.relu(self.bn1(self.expand(h)))))  # residual: stem/project widths observable
        h = F.relu(self.bn3(self.spatial(h)))
        h = self.depthwise(F.relu(self.mix(h)))
        return self.head(h.mean(dim=(2, 3)))


class ReadsAWeight(nn.Module):
    """``fc``'s weight computed with by the model's own code, as torchvision's Swin attention does with its qkv;
    ``head``'s weight only asked for its shape. ``untraceable``: a branch on a shape, which symbolic_trace cannot
    follow and torch.export can."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.a, self.fc, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        if self.untraceable and x.shape[0] > 0:
            x = x + 0.0
        h = F.relu(F.linear(F.relu(self.a(x)), self.fc.weight, self.fc.bias))
        return self.head(h) * (self.head.weight.shape[1] / 32)


class Block(nn.Module):
    """A pre-norm transformer block written with Linear layers (no MultiheadAttention)."""

    def __init__(self, d=32, heads=4, hidden=64):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FoldNet(nn.Module):
    """Each case of the fold's contract once: folded BNs are named bn_*, the others say why they stay."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # kept dense (keep_first_dense)
        self.bn_stem = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1, bias=False)  # no bias; compact once shrink removes its ablated rows
        self.bn_expand = nn.BatchNorm2d(32, affine=False)
        self.project = nn.Conv2d(32, 16, 1)  # full width (its BN feeds the residual add), ablated rows
        self.bn_project = nn.BatchNorm2d(16)
        self.branch = nn.Conv2d(16, 16, 3, padding=1)
        self.branch_norm = nn.BatchNorm2d(16)  # branch's output also feeds the add: stays
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.shared_norm = nn.BatchNorm2d(16)  # called twice: stays
        self.fc = nn.Linear(16 * 4, 24)  # input flattened from dim 1: output [batch, features]
        self.bn_fc = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.bn_stem(self.stem(x)))
        h = h + self.bn_project(self.project(F.relu(self.bn_expand(self.expand(h)))))
        b = self.branch(h)
        h = F.relu(self.branch_norm(b)) + b
        h = self.shared_norm(self.mix(h)) + self.shared_norm(h)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 2), 1)
        return self.head(F.relu(self.bn_fc(self.fc(h))))


def masked_foldnet():
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, seed=2, keep_first_dense=True)
    masked = randomize_bn(sparsify(FoldNet(), config))
    ablate(masked, {"expand": [0, 3, 9], "project": [2], "fc": [1, 4], "branch": [5]},
           {("project", 2): 0.7, ("fc", 4): -0.6})
    return masked.eval()


def make_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    return transformers.GPT2LMHeadModel(config), ids


def make_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    return transformers.LlamaForCausalLM(config), ids


DECODERS = {"gpt2": make_gpt2, "llama": make_llama}


class WeightNormAndRNN(nn.Module):
    """A weight-normed conv (Wav2Vec2's positional conv) and an LSTM: neither can be masked."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.rnn(self.conv(x).transpose(1, 2))
        return self.head(h[:, -1])


def prune_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 10))


# -- importing already-pruned weights ----------------------------------------------------------------------------
def zeroed(net: nn.Module, keep_per_row: dict[str, int], seed=0) -> nn.Module:
    """Zero all but the given number of weights in each row of the named layers (a dense-stored pruned model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, keep in keep_per_row.items():
            weight = net.get_submodule(name).weight
            order = torch.rand(weight.shape, generator=g).argsort(dim=1)
            weight.scatter_(1, order[:, keep:], 0.0)
    return net


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, groups=4, bias=False)  # grouped
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block = ResBlock(16, 32, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise
        self.dw_bn = nn.BatchNorm2d(32)
        self.seq = nn.Conv1d(32, 24, 3, padding=1)  # over the flattened spatial positions
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = self.block(h)
        h = F.relu(self.dw_bn(self.dw(h)) + h)
        h = F.relu(self.seq(h.flatten(2)))
        return self.fc(h.mean(dim=2))


def make_cnn(cls=SmallResNet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = cls()
    with torch.no_grad():  # non-trivial BN state, so "untouched" means something
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def make_encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


def lowered_attention_encoder(batch_first: bool):
    """(masked, lowered, x): a 2-layer pre-norm encoder (d 128, 2 heads of 64: the attention kernel's shape) at 70%."""
    from srigl_compile import lower

    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(128, 2, 256, dropout=0.0, batch_first=batch_first, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 11, 128) if batch_first else torch.randn(11, 2, 128)
    masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform"), example_inputs=(x,))
    return masked, lower(masked, example_inputs=(x,), progress=False), x


CNN_FAN_IN = {  # in_channels / groups * kernel size
    "stem": 3 * 9,
    "block.conv1": 16 * 9,
    "block.conv2": 32 // 4 * 9,
    "block.down.0": 16 * 1,
    "dw": 1 * 9,
    "seq": 32 * 3,
    "fc": 24,
}


def bn_mlp() -> nn.Module:
    """Linear -> BatchNorm1d -> ReLU -> Linear in eval mode, with made-up trained statistics (mean 0.1, variance 4,
    7 batches counted) that a recalibration must reset, or leave as they were when it fails."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[1].running_mean.fill_(0.1)
        net[1].running_var.fill_(4.0)
        net[1].num_batches_tracked.fill_(7)
    return net.eval()


class WithResidual(nn.Module):
    """A layer called with a residual, as a block's last layer is once its add is fused (``layer(x, residual=r)``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, residual):
        return self.layer(x, residual=residual)
