"""Gradient hooks on sparse weights: record the dense gradient (only in the window before a mask update) and hand
the optimizer the masked gradient.

The weight is stored densely, so autograd already computes the dense gradient: the grow criterion costs no extra
backward pass, only one buffer per layer while the window is open (SRIGL_SPEC §2.5).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

__all__ = ["GradientTap"]


class GradientTap:
    """Tensor hooks on every sparse weight. ``active`` opens the accumulation window; ``take`` empties it.

    Each backward adds grad / n to a float32 buffer, so the buffer holds the mean over the last n optimizer
    steps (micro-batches of one step add up to that step's gradient, as the optimizer sees it).
    """

    def __init__(self, layers: dict[str, nn.Module], accumulation_n: int) -> None:
        self.active = False
        self.accumulation_n = accumulation_n
        self.buffers: dict[str, torch.Tensor] = {}
        self._handles = [
            layer.weight.register_hook(functools.partial(self._hook, name, layer)) for name, layer in layers.items()
        ]

    def _hook(self, name: str, layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        if self.active:
            buffer = self.buffers.get(name)
            if buffer is None:
                # A new tensor, never the incoming gradient itself (.float() of fp32 would alias it).
                self.buffers[name] = grad.detach().float() / self.accumulation_n
            else:
                buffer.add_(grad.detach(), alpha=1.0 / self.accumulation_n)
        return torch.where(layer.mask, grad, 0.0)

    def has(self, name: str) -> bool:
        return name in self.buffers

    def take(self, name: str) -> torch.Tensor | None:
        return self.buffers.pop(name, None)

    def release(self) -> None:
        self.buffers.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()
