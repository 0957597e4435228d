"""One-shot pruning of a trained layer to constant fan-in: score every weight, keep each neuron's top k.

Pure tensor maths on neuron views [n_out, fan_in]. Criteria:
- magnitude: |W|;
- Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): |W_ij| x ||X_j||_2, the weight
  times the L2 norm of its input feature over calibration inputs. Wanda compares weights within each output row,
  so its masks have the same count in every row: constant fan-in by construction.
Optional ablation reuses SRigL's rule with the prune-time scores: a neuron with fewer than gamma_sal x k0 weights
among the layer's ``budget`` highest scores is dropped, and its share of the budget goes to the others.

Example:
    >>> w = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.1, -0.2]])
    >>> prune_to_fan_in(magnitude_scores(w), budget=4, k0=2, ablation=False, gamma_sal=0.3).mask.int().tolist()
    [[0, 1, 1], [1, 0, 1]]
"""

from __future__ import annotations

import dataclasses

import torch

from .distribution import constant_fan_in
from .scores import LayerScores
from .selection import neurons_to_ablate, top_per_row_mask

__all__ = ["PruneResult", "magnitude_scores", "wanda_scores", "prune_to_fan_in"]


@dataclasses.dataclass(frozen=True)
class PruneResult:
    mask: torch.Tensor  # bool [n_out, fan_in]
    ablated: torch.Tensor  # bool [n_out]
    k: int


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| x ||X_j||: ``input_norms`` broadcasts to the weight ([fan_in], or [n_out, fan_in] where rows read
    different inputs: grouped convolutions, packed q/k/v projections)."""
    return weight.detach().abs().float() * input_norms.float()


def prune_to_fan_in(scores: torch.Tensor, *, budget: int, k0: int, ablation: bool, gamma_sal: float) -> PruneResult:
    """Each neuron keeps its k highest-scoring inputs: k = k0, or budget // survivors when ablation drops neurons.
    Ties are broken deterministically (torch.topk)."""
    n_out = scores.shape[0]
    if ablation:
        never = torch.full_like(scores, float("-inf"))
        ablated = neurons_to_ablate(LayerScores(scores, never), budget, 0, budget, gamma_sal)
    else:
        ablated = torch.zeros(n_out, dtype=torch.bool)
    # neurons_to_ablate keeps enough survivors that k <= fan_in.
    k = constant_fan_in(budget, n_out - int(ablated.sum())) if ablation else k0
    return PruneResult(top_per_row_mask(scores, torch.where(ablated, 0, k)), ablated, k)
