"""Gradient hooks on sparse weights: record the dense gradient (only in the window before a mask update) and hand
the optimizer the masked gradient.

The weight is stored densely, so autograd already computes the dense gradient: the grow criterion costs no extra
backward pass, only one buffer per layer while the window is open (SRIGL_SPEC §2.5).

A step's gradient is held apart (``pending``) until the updater learns whether the optimizer took the step:
a step that a GradScaler skips (inf/NaN in the scaled gradients) is dropped, not averaged into the window.

Weights sharded by FSDP2 get no tensor hooks (autograd runs on the unsharded copy; the shard receives the
reduce-scattered gradient afterwards): their gradient is recorded and masked just before the optimizer steps
(``before_optimizer_step``), already averaged over ranks and unscaled. Their window holds this rank's rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn

from ..nn.sharding import is_sharded, local_part, part_like, whole_like

__all__ = ["GradientTap"]


class GradientTap:
    """Tensor hooks on every sparse weight. ``active`` opens the accumulation window; ``take`` empties it.

    Each backward adds its gradient to the step's ``pending`` sum (micro-batches of one step add up to that step's
    gradient, as the optimizer sees it); ``commit`` adds pending / n to the window's float32 buffer, so the buffer
    holds the mean over the last n optimizer steps. ``loss_scale`` (a GradScaler's ``get_scale``) is read once per
    recorded step and divided out, so steps recorded at different loss scales weigh alike.
    """

    def __init__(self, layers: dict[str, nn.Module], accumulation_n: int,
                 loss_scale: Callable[[], float] | None = None) -> None:
        self.active = False
        self.accumulation_n = accumulation_n
        self.loss_scale = loss_scale
        self.buffers: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self._step_scale: float | None = None
        self.layers = layers
        self.sharded = {name: layer for name, layer in layers.items() if is_sharded(layer.weight)}
        self._handles = [
            layer.weight.register_hook(functools.partial(self._hook, name, layer))
            for name, layer in layers.items() if name not in self.sharded
        ]

    def _hook(self, name: str, layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        if self.active:
            if self._step_scale is None:
                self._step_scale = float(self.loss_scale()) if self.loss_scale is not None else 1.0
            pending = self.pending.get(name)
            if pending is None:
                # A new tensor, never the incoming gradient itself (.float() of fp32 would alias it).
                self.pending[name] = grad.detach().float() / self._step_scale
            else:
                pending.add_(grad.detach(), alpha=1.0 / self._step_scale)
        return torch.where(layer.mask, grad, 0.0)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Record (when the window is open) and mask the sharded weights' gradients."""
        for name, layer in self.sharded.items():
            grad = layer.weight.grad
            if grad is None:
                continue
            part = local_part(grad)
            if self.active:
                self.pending[name] = part.float().clone()
            part.masked_fill_(~part_like(layer.mask, grad), 0)

    def commit(self) -> None:
        """The optimizer took the step: its gradient joins the window."""
        for name, pending in self.pending.items():
            buffer = self.buffers.get(name)
            if buffer is None:
                self.buffers[name] = pending.div_(self.accumulation_n)
            else:
                buffer.add_(pending, alpha=1.0 / self.accumulation_n)
        self.discard()

    def discard(self) -> None:
        """The optimizer skipped the step (or there is no window): forget its gradient."""
        self.pending = {}
        self._step_scale = None

    def has(self, name: str) -> bool:
        return name in self.buffers

    def take(self, name: str) -> torch.Tensor | None:
        """The layer's window, whole (gathered from every rank for a sharded weight: a collective)."""
        buffer = self.buffers.pop(name, None)
        return whole_like(buffer, self.layers[name].weight) if buffer is not None else None

    def release(self) -> None:
        self.buffers.clear()
        self.discard()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()
