"""A reference training loop (SGD + cosine LR) with SRigL, checkpoints and exact resume.

Used by the CLI, the demo, the tests and the benchmarks, so that all of them train the same way.

Example:
    >>> result = train_digits(method="srigl", sparsity=0.9, epochs=2, seed=0)   # doctest: +SKIP
    >>> result.accuracy > 0.5                                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .config import DENSE, SRigLConfig, training_config
from .data import ArrayData, load_digits
from .errors import CheckpointError, TrainingError
from .passes.sparsify import sparse_layers, sparsify
from .training.updater import SRigLUpdater
from .zoo import build_model

__all__ = ["TrainResult", "train_classifier", "train_digits", "evaluate", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "srigl_compile.train/1"


@dataclasses.dataclass
class TrainResult:
    accuracy: float
    losses: list[float]
    model: nn.Module
    updater: SRigLUpdater | None
    history: list[dict[str, Any]]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / max(len(y), 1)


@dataclasses.dataclass
class _State:
    step: int = 0
    epoch: int = 0
    epoch_generator: torch.Tensor | None = None  # data-order generator state at the start of the epoch
    losses: list = dataclasses.field(default_factory=list)
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Ranks:
    """This process's place in a data-parallel run (torchrun); one rank when torch.distributed is not set up."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> _Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_size(self, n: int) -> int:
        return -(-n // self.world)  # DistributedSampler pads every rank to the same count

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (itself on one rank)."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def epoch_order(self, n: int, epoch: int, seed: int, generator: torch.Generator) -> torch.Tensor:
        """This rank's sample order for one epoch: a shuffle by ``generator``, or this rank's DistributedSampler
        shard (seeded by ``seed`` and the epoch, so it needs no state of its own)."""
        if self.world == 1:
            return torch.randperm(n, generator=generator)
        sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))


def _save(path: Path, model, optimizer, scheduler, updater, state: _State, meta: dict, ranks: _Ranks) -> None:
    """Every rank takes part (the updater gathers each rank's open gradient window); rank 0 writes."""
    updater_state = updater.state_dict() if updater else None
    if ranks.is_main:
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"parameters {bad[:5]} are not finite at step {state.step}: not saving a checkpoint "
                                "of them (lower --lr, or resume from the last good checkpoint)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own (two runs writing one folder collided on a fixed .tmp), swapped in whole: never a
        # half-written checkpoint under the real name
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (made by torch.save: the umask's mode)
        try:
            torch.save({
                "format": CHECKPOINT_FORMAT, "meta": meta, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "updater": updater_state,
                "state": dataclasses.asdict(state),
            }, staging)
            staging.replace(path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    if ranks.world > 1:
        dist.barrier()  # nobody reads or overwrites the file before it is whole


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint; a missing, foreign or mask-less file is a CheckpointError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch.load raises pickle/zip errors of several types
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a srigl_compile training checkpoint")
    missing = [key for key in ("meta", "model") if not isinstance(checkpoint.get(key), dict)]
    if missing:
        raise CheckpointError(f"{path} is a damaged training checkpoint (no {missing}): train again, or use "
                              "another checkpoint of the run")
    if checkpoint["meta"].get("method") != DENSE and not any(k.endswith(".mask") for k in checkpoint["model"]):
        raise CheckpointError(f"{path} holds no masks: it was not saved from a sparsified model")
    return checkpoint


def train_classifier(
    model: nn.Module,
    data: ArrayData,
    config: SRigLConfig | None,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    on_step: Callable[[int, SRigLUpdater | None], None] | None = None,
) -> TrainResult:
    """SGD (Nesterov momentum 0.9, weight decay 1e-4) with a cosine learning rate.

    ``config=None`` trains dense; otherwise the model is sparsified with ``config`` (unless it has masked layers
    already: a pruned model is fine-tuned with its masks) and trained with an SRigLUpdater. Every ``checkpoint_every`` steps (and at the end) a checkpoint goes to ``checkpoint_path``;
    ``resume`` (a ``load_checkpoint`` result) continues a run exactly where it stopped.

    Under torchrun (torch.distributed initialised) the model trains as DistributedDataParallel, each rank on its
    DistributedSampler shard of the data, the masks kept identical by the updater; rank 0 writes checkpoints and
    shows progress. ``losses`` are means over the ranks. A non-finite loss stops the run with ``TrainingError``.
    """
    torch.manual_seed(seed)
    ranks = _Ranks.current()
    if config is not None and not any(True for _ in sparse_layers(model)):  # a pruned model is fine-tuned as it is
        model = sparsify(model, config, example_inputs=(data.x_train[:2],))
    steps_per_epoch = -(-ranks.shard_size(len(data.y_train)) // batch_size)
    total = epochs * steps_per_epoch
    forward = DistributedDataParallel(model) if ranks.world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    updater = SRigLUpdater(forward, optimizer, config, total_steps=total) if config is not None else None
    generator, state = torch.Generator().manual_seed(seed), _State()
    if resume is not None:
        state = _restore(resume, model, optimizer, scheduler, updater, generator)
    meta = dict(meta or {}, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    bar = _progress(total, progress and ranks.is_main, initial=state.step)
    for epoch in range(state.epoch, epochs):
        if state.epoch_generator is None or epoch != state.epoch:
            state.epoch, state.epoch_generator = epoch, generator.get_state()
        generator.set_state(state.epoch_generator)
        order = ranks.epoch_order(len(data.y_train), epoch, seed, generator)
        for start in range((state.step - epoch * steps_per_epoch) * batch_size, len(order), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(data.x_train[idx]), data.y_train[idx])
            mean_loss = ranks.mean(loss.detach())
            if not torch.isfinite(mean_loss):  # the mean: every rank stops at the same step
                raise TrainingError(f"the loss is {mean_loss.item()} at step {state.step + 1} (epoch {epoch + 1}): "
                                    f"training diverged. Lower the learning rate (lr={lr}); no checkpoint was written "
                                    "for this step")
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.step += 1
            if updater is not None and updater.step():
                state.history.append(updater.stats())
            state.losses.append(mean_loss.item())
            if on_step is not None:
                on_step(state.step, updater)
            if checkpoint_path and checkpoint_every and state.step % checkpoint_every == 0:
                _save(Path(checkpoint_path), model, optimizer, scheduler, updater, state, meta, ranks)
            bar.update(1)
        state.epoch_generator = None
    bar.close()
    if checkpoint_path:
        state.epoch = epochs
        _save(Path(checkpoint_path), model, optimizer, scheduler, updater, state, meta, ranks)
    return TrainResult(evaluate(model, data.x_test, data.y_test), state.losses, model, updater, state.history)


def _restore(checkpoint, model, optimizer, scheduler, updater, generator) -> _State:
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(f"the checkpoint does not fit this model (another architecture or sparsity; it was "
                              f"made with {checkpoint['meta']}): {str(err).splitlines()[0]}") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if updater is not None:
        if checkpoint["updater"] is None:
            raise CheckpointError("the checkpoint is from a dense run; resume it without a sparsity config")
        updater.load_state_dict(checkpoint["updater"])
    state = _State(**checkpoint["state"])
    if state.epoch_generator is not None:
        generator.set_state(state.epoch_generator)
    return state


def train_digits(method: str = "srigl", sparsity: float = 0.9, *, model: str = "mlp", epochs: int = 30,
                 seed: int = 0, progress: bool = False, **config_fields: Any) -> TrainResult:
    """Train a zoo model on digits, dense (``method='dense'``) or sparse with the given method."""
    data = load_digits(seed)
    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes)
    config = training_config(method, sparsity=sparsity, seed=seed, delta_t=config_fields.pop("delta_t", 20),
                             **config_fields)
    return train_classifier(net, data, config, epochs=epochs, seed=seed, progress=progress)


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs and CI.
    return tqdm(total=total, initial=initial, disable=None if enabled else True, desc="training", leave=False)
