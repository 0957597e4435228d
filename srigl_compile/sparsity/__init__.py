"""The mathematics of SRigL: budgets, fan-in, per-neuron top-k, ablation, schedules. Pure tensor code."""

from .distribution import constant_fan_in, erk_densities, layer_budget, uniform_densities
from .schedule import UpdateSchedule
from .scores import LayerScores, gradient_grow_scores, magnitude_drop_scores, non_finite_weights, random_grow_scores
from .selection import (
    Selection,
    check_constant_fan_in,
    neurons_to_ablate,
    random_fan_in_mask,
    row_counts,
    srigl_select,
    unstructured_select,
)

__all__ = [
    "constant_fan_in",
    "erk_densities",
    "layer_budget",
    "uniform_densities",
    "UpdateSchedule",
    "LayerScores",
    "gradient_grow_scores",
    "magnitude_drop_scores",
    "non_finite_weights",
    "random_grow_scores",
    "Selection",
    "check_constant_fan_in",
    "neurons_to_ablate",
    "random_fan_in_mask",
    "row_counts",
    "srigl_select",
    "unstructured_select",
]
