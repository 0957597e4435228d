"""The masks a run started from, which a checkpoint's masks are checked against: per layer, its non-zeros, ablated
neurons and fan-in.

``sparsify``'s masks hold n_out x k0 non-zeros with no neuron ablated; a pruned model (``prune(...,
ablation=True)``) or ``from_sparse_weights`` may start with ablated neurons and another k. A method that never
ablates keeps such a start's ablated neurons (static keeps its whole masks; SRigL without ablation until its first
update), and RigL and SET keep its number of non-zeros, so a resumed run is checked against where it started, not
against sparsify's masks. Checkpoints older than the record started from sparsify's.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from ..sparsity.selection import row_counts

__all__ = ["LayerStart", "start_of", "sparsify_start", "parse_start"]


@dataclasses.dataclass(frozen=True)
class LayerStart:
    nnz: int
    ablated: int  # neurons with no inputs
    k: int  # the largest fan-in (constant fan-in methods: every active neuron's)

    def to_list(self) -> list[int]:
        return [self.nnz, self.ablated, self.k]


def start_of(layer: Any) -> LayerStart:
    """The start record of a masked layer's current mask."""
    counts = row_counts(layer.neuron_view(layer.mask))
    return LayerStart(int(counts.sum()), int((counts == 0).sum()), int(counts.max()))


def sparsify_start(plan: Any) -> LayerStart:
    """What ``sparsify`` starts a layer with (``LayerPlan``): k0 inputs for every neuron."""
    return LayerStart(plan.n_out * plan.k0, 0, plan.k0)


def parse_start(value: Any, plan: Any, constant_fan_in: bool) -> LayerStart:
    """A saved ``to_list()`` checked against the layer's plan.

    Raises:
        ValueError: not three ints, or counts the layer cannot hold (the message says which).
    """
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{value!r} must be [non-zeros, ablated neurons, fan-in], three ints >= 0")
    start = LayerStart(*(int(v) for v in value))
    if not 0 < start.nnz <= plan.budget or start.ablated >= plan.n_out or not 0 < start.k <= plan.fan_in:
        raise ValueError(f"{start.to_list()} does not fit the layer (budget {plan.budget}, {plan.n_out} neurons, "
                         f"fan-in {plan.fan_in})")
    if constant_fan_in and start.nnz != start.k * (plan.n_out - start.ablated):
        raise ValueError(f"{start.to_list()} is not constant fan-in: {start.nnz} non-zeros != k {start.k} x "
                         f"{plan.n_out - start.ablated} active neurons")
    return start
