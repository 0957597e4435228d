"""The edits passes make to a Linear or Conv layer, whatever its form.

Condensed layers own theirs (``scale_outputs_``, ``drop_inputs_``, ``out_width``, ``bias_width`` on the classes
of ``nn/condensed.py``, which keep their invariants); dense ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` get the
same methods from ``DENSE_EDITS``, a table keyed by type (what differs between them is where they keep their
widths).

Example:
    >>> import torch, torch.nn as nn
    >>> layer = nn.Linear(4, 3)
    >>> layer_edits(layer).out_width
    3
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

__all__ = ["layer_edits", "DenseEdits", "DENSE_EDITS"]


@dataclasses.dataclass(frozen=True)
class DenseEdits:
    """A dense layer type's edits: ``in_attr`` / ``out_attr`` name its input and output widths."""

    in_attr: str
    out_attr: str

    def bind(self, layer: nn.Module) -> _BoundDense:
        return _BoundDense(self, layer)


DENSE_EDITS = {nn.Linear: DenseEdits("in_features", "out_features"),
               nn.Conv1d: DenseEdits("in_channels", "out_channels"),
               nn.Conv2d: DenseEdits("in_channels", "out_channels")}


@dataclasses.dataclass(frozen=True)
class _BoundDense:
    kind: DenseEdits
    layer: nn.Module

    @property
    def out_width(self) -> int:
        return getattr(self.layer, self.kind.out_attr)

    @property
    def bias_width(self) -> int:
        return self.out_width

    @torch.no_grad()
    def scale_outputs_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """y -> y * scale + shift per output channel (float64 scale / shift). New Parameters, not in-place: a
        weight tied to another layer stays as it was. (torch.nn.utils.fusion's fuse_*_bn_weights needs an affine
        BatchNorm and eval-mode modules; this is the same formula.)"""
        layer = self.layer
        weight = layer.weight
        rows = scale.view(-1, *[1] * (weight.dim() - 1))
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
        layer.weight = nn.Parameter((weight.double() * rows).to(weight.dtype), weight.requires_grad)
        layer.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), weight.requires_grad)

    @torch.no_grad()
    def drop_inputs_(self, keep: torch.Tensor, constant: torch.Tensor) -> None:
        """Remove the input channels where ``keep`` is False, whose input is the constant ``constant[c]``, folding
        what they contributed into the bias (a conv's kernel taps add up)."""
        layer = self.layer
        weight = layer.weight.detach()
        per_input = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)
        fold = per_input[:, ~keep] @ constant[~keep]
        if layer.bias is None:
            layer.bias = nn.Parameter(fold.clone())
        else:
            layer.bias.add_(fold)
        layer.weight = nn.Parameter(weight[:, keep].clone())
        setattr(layer, self.kind.in_attr, int(keep.sum()))


def layer_edits(layer: nn.Module):
    """What a pass edits ``layer`` through: the layer itself when it owns its edits (condensed), else its dense
    type's entry in ``DENSE_EDITS`` (the nearest base class listed there), bound to it."""
    if hasattr(layer, "drop_inputs_"):
        return layer
    kind = next((DENSE_EDITS[cls] for cls in type(layer).__mro__ if cls in DENSE_EDITS), None)
    if kind is None:
        raise TypeError(f"no edits for {type(layer).__name__}: condensed layers and {list(DENSE_EDITS)} have them")
    return kind.bind(layer)
