"""Ready-made training runs on embedded data (scikit-learn's bundled digits: no download).

Used by the demo, the tests and the benchmarks, so that all of them train the same way.

Example:
    >>> result = train_digits(method="srigl", sparsity=0.9, epochs=2, seed=0)   # doctest: +SKIP
    >>> result.accuracy > 0.5                                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SRigLConfig
from .passes.sparsify import sparsify
from .training.updater import SRigLUpdater

__all__ = ["DigitsData", "load_digits", "digits_mlp", "digits_cnn", "TrainResult", "train_classifier", "train_digits"]


@dataclasses.dataclass
class DigitsData:
    """8x8 digit images as float tensors [N, 1, 8, 8] scaled to [0, 1], labels [N]; a fixed train/test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    from sklearn.datasets import load_digits as sk_load_digits  # optional dependency, imported on use

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


def digits_mlp(hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def digits_cnn(channels: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, 128), nn.ReLU(), nn.Linear(128, 10),
    )


@dataclasses.dataclass
class TrainResult:
    accuracy: float
    losses: list[float]
    model: nn.Module
    updater: SRigLUpdater | None
    history: list[dict[str, Any]]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return accuracy


def train_classifier(
    model: nn.Module,
    data: DigitsData,
    config: SRigLConfig | None,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    on_step: Callable[[int, SRigLUpdater | None], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """SGD with momentum and cosine learning rate. ``config=None`` trains dense; otherwise the model is sparsified
    with ``config`` and trained with an SRigLUpdater. ``on_step(step, updater)`` runs after every update call."""
    torch.manual_seed(seed)
    if config is not None:
        model = sparsify(model, config)
    steps_per_epoch = -(-len(data.y_train) // batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    updater = SRigLUpdater(model, optimizer, config, total_steps=total) if config is not None else None
    generator = torch.Generator().manual_seed(seed)
    losses, history, step = [], [], 0
    bar = _progress(total, progress)
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if updater is not None and updater.step():
                history.append(updater.stats())
            if on_step is not None:
                on_step(step, updater)
            losses.append(loss.item())
            bar.update(1)
    bar.close()
    return TrainResult(evaluate(model, data.x_test, data.y_test), losses, model, updater, history)


def train_digits(method: str = "srigl", sparsity: float = 0.9, *, model: str = "mlp", epochs: int = 30,
                 seed: int = 0, progress: bool = False, **config_fields: Any) -> TrainResult:
    """Train an MLP or CNN on digits, dense (``method='dense'``) or sparse with the given method."""
    torch.manual_seed(seed)
    net = digits_mlp() if model == "mlp" else digits_cnn()
    config = None if method == "dense" else SRigLConfig(sparsity=sparsity, method=method, seed=seed,
                                                       delta_t=config_fields.pop("delta_t", 20), **config_fields)
    return train_classifier(net, load_digits(seed), config, epochs=epochs, seed=seed, progress=progress)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if enabled else True, desc="training", leave=False)  # None: off when not a TTY
