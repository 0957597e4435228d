"""A small model zoo for the CLI and benchmarks, and ``module:factory`` loading of user models.

Example:
    >>> build_model("mlp", input_shape=(1, 8, 8), num_classes=10)[1].in_features
    64
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["MODELS", "build_model", "mlp", "small_cnn", "cifar_resnet18", "SmallViT", "ResNet", "resnet50",
           "vit_b16"]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def small_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """The CIFAR ResNet-18 of the SRigL paper's CIFAR runs (3x3 stem, no max-pool, 4 stages)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarResNet18(num_classes, in_channels=input_shape[0])


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's ResNet v1.5), 1x1 expand by 4; projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The ImageNet ResNet (7x7/2 stem, 3x3/2 max-pool, 4 stages); ``blocks=(3, 4, 6, 3)`` is ResNet-50, and with
    ``basic=True`` (two 3x3 convolutions a block, no expansion) ResNet-34; ``(2, 2, 2, 2)`` basic is ResNet-18.

    Defined here because torchvision is not a dependency; the layer shapes match torchvision's resnet18/34/50.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, blocks: tuple[int, ...] = (3, 4, 6, 3),
                 width: int = 64, basic: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)  # a module, as in torchvision (lower() fuses it into conv1's kernel)
        self.maxpool = nn.MaxPool2d(3, 2, 1)  # a module, as in torchvision (lower() runs it in TVM)
        stages, cin = [], width
        for i, count in enumerate(blocks):
            for j in range(count):
                stride = 2 if i and not j else 1
                if basic:
                    stages.append(_BasicBlock(cin, width * 2**i, stride))
                    cin = width * 2**i
                else:
                    stages.append(_Bottleneck(cin, width * 2**i, stride))
                    cin = 4 * width * 2**i
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a module, as in torchvision (lower() runs it in TVM)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(self.layers(out)).flatten(1))


def resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(num_classes, in_channels=input_shape[0])


def resnet34(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(num_classes, in_channels=input_shape[0], basic=True)


class SmallViT(nn.Module):
    """A small Vision Transformer: conv patch embedding, class token, nn.TransformerEncoder, linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        channels, height, width = input_shape
        patch = min(patch, height, width)
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        tokens = (height // patch) * (width // patch) + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def vit_b16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ViT-B/16's shape (16x16 patches, 12 layers, width 768, 12 heads, MLP 3072): 197 tokens at 224x224."""
    return SmallViT(input_shape, num_classes, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072)


MODELS = {"mlp": mlp, "cnn": small_cnn, "resnet18": cifar_resnet18, "vit": SmallViT, "resnet34": resnet34,
          "resnet50": resnet50, "vit_b16": vit_b16}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A zoo model by name, or a user's ``package.module:factory`` called as factory(input_shape, num_classes)."""
    if name in MODELS:
        if name != "mlp" and len(input_shape) != 3:  # (a traceback at the first batch otherwise)
            raise ConfigError(f"model {name!r} takes images (channels, height, width); the data's samples have shape "
                              f"{tuple(input_shape)}: choose image data (digits, mnist, cifar10, cifar100) or the "
                              "mlp")
        return MODELS[name](input_shape, num_classes)
    if ":" not in name:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or give 'module:factory'")
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise ConfigError(f"cannot load model factory {name!r}: give 'package.module:factory' (an absolute module "
                          "name, a colon, the factory's name)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as err:  # (whatever importing the name raises)
        raise ConfigError(f"cannot load model factory {name!r}: {err}") from None
    contract = "a model factory is called as factory(input_shape, num_classes) and returns an nn.Module"
    if not callable(factory):
        raise ConfigError(f"{name} is a {type(factory).__name__}, not a function: {contract}")
    try:
        model = factory(input_shape, num_classes)
    except TypeError as err:  # (a factory with another signature, such as os:getcwd)
        raise ConfigError(f"{name}(input_shape, num_classes) failed ({err}): {contract}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} returned {type(model).__name__}, not an nn.Module: {contract}")
    return model
