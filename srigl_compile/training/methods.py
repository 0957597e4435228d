"""One object per training method: what differs between SRigL, RigL, SET and static at a mask update.

Everything else (schedule, gradient window, applying a selection, optimizer state, invariants of the weights,
checkpoints) is shared by the updater; it asks the method's rule instead of comparing method names.
"""

from __future__ import annotations

import torch

from ..config import Method, SRigLConfig
from ..nn.masked import LayerPlan
from ..sparsity import (
    LayerScores,
    Selection,
    gradient_grow_scores,
    random_grow_scores,
    srigl_select,
    unstructured_select,
)

__all__ = ["MethodRule", "method_rule"]


class MethodRule:
    """The unstructured gradient method (RigL); the others override what they change."""

    method = Method.RIGL
    updates = True  # masks change during training
    needs_gradients = True  # grows by the recorded dense gradient (the window is recorded only then)
    constant_fan_in = False  # every active neuron keeps the same number of inputs

    def may_ablate(self, config: SRigLConfig, plan: LayerPlan) -> bool:
        """Whether a neuron of this layer may end with no inputs."""
        return False

    def grow_scores(self, dense_grad: torch.Tensor | None, shape: torch.Size, layer: str,
                    generator: torch.Generator) -> torch.Tensor:
        return gradient_grow_scores(dense_grad, layer)

    def select(self, mask: torch.Tensor, scores: LayerScores, plan: LayerPlan, drop_fraction: float,
               config: SRigLConfig) -> Selection:
        return unstructured_select(mask, scores, drop_fraction)


class SRigLRule(MethodRule):
    method = Method.SRIGL
    constant_fan_in = True

    def may_ablate(self, config: SRigLConfig, plan: LayerPlan) -> bool:
        return config.ablation and not plan.protected

    def select(self, mask, scores, plan, drop_fraction, config):
        return srigl_select(mask, scores, plan.budget, drop_fraction, ablation=self.may_ablate(config, plan),
                            gamma_sal=config.gamma_sal)


class SETRule(MethodRule):
    method = Method.SET
    needs_gradients = False

    def grow_scores(self, dense_grad, shape, layer, generator):
        return random_grow_scores(shape, generator)


class StaticRule(MethodRule):
    method = Method.STATIC
    updates = False
    needs_gradients = False
    constant_fan_in = True  # sparsify's masks, kept


_RULES = {rule.method: rule for rule in (MethodRule(), SRigLRule(), SETRule(), StaticRule())}


def method_rule(method: Method) -> MethodRule:
    return _RULES[method]
