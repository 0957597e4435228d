"""Scores that the selection rules rank: "compute the scores", kept apart from "select from the scores".

A distributed trainer can average these tensors across ranks before selection without touching selection code.
All tensors are neuron views [n_out, fan_in].
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InvariantError

__all__ = ["LayerScores", "magnitude_drop_scores", "gradient_grow_scores", "random_grow_scores",
           "non_finite_weights"]


@dataclasses.dataclass
class LayerScores:
    """drop: |W| where active, -inf where inactive. grow: over all positions (active ones included)."""

    drop: torch.Tensor
    grow: torch.Tensor


def magnitude_drop_scores(weight: torch.Tensor, mask: torch.Tensor, layer_name: str = "") -> torch.Tensor:
    magnitudes = weight.detach().abs().float()
    if not torch.isfinite(magnitudes).all():
        raise InvariantError(non_finite_weights(layer_name, "at a mask update"))
    # Inactive positions get -inf rather than 0 so an active weight that happens to be 0 (a fresh regrowth)
    # can never tie with, and lose its place to, an inactive position.
    return magnitudes.masked_fill(~mask, float("-inf"))


def non_finite_weights(layer_name: str, when: str) -> str:
    """The message of a sparse layer's NaN / inf weights: training diverged."""
    layer = f"layer {layer_name!r}" if layer_name else "a sparse layer"
    return (f"{layer} has non-finite weights (NaN or inf) {when}: training diverged; lower the learning rate or "
            "clip gradients, and resume from the last good checkpoint")


def gradient_grow_scores(dense_grad: torch.Tensor, layer_name: str) -> torch.Tensor:
    scores = dense_grad.detach().abs().float()
    if not torch.isfinite(scores).all():
        raise InvariantError(
            f"layer {layer_name!r}: the accumulated dense gradient has NaN/inf entries at a mask update; "
            "fix the divergence (lower the learning rate, clip gradients) before the update"
        )
    return scores


def random_grow_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """SET's regrowth: a uniformly random order drawn from the updater's explicit generator."""
    return torch.rand(shape, generator=generator)
