"""Select new masks from scores: constant-fan-in init, SRigL drop/grow/ablation, unstructured RigL/SET.

Pure tensor maths on neuron views [n_out, fan_in] (a conv's [out, in/g, kh, kw] flattened to [out, in/g*kh*kw]).
Every selection ends by checking its own invariants and raises ``InvariantError`` on violation. Ties are broken
deterministically, so a selection is a deterministic function of its inputs.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> mask = random_fan_in_mask(4, 10, 3, g)
    >>> mask.sum(1).tolist()
    [3, 3, 3, 3]
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import InvariantError
from .distribution import constant_fan_in
from .scores import LayerScores

__all__ = [
    "Selection",
    "random_fan_in_mask",
    "top_n_mask",
    "top_per_row_mask",
    "ablation_threshold",
    "neurons_to_ablate",
    "srigl_select",
    "unstructured_select",
    "check_constant_fan_in",
    "row_counts",
]

NEG_INF = float("-inf")


@dataclasses.dataclass
class Selection:
    """Result of one mask update of one layer.

    kept: old active positions that survive the drop. grown: positions (re)activated by the grow step, disjoint
    from kept (a just-dropped position may be regrown). new_mask = kept | grown. ablated: [n_out] neurons with no
    inputs. k: the constant fan-in of active neurons (None for unstructured methods).
    """

    new_mask: torch.Tensor
    kept: torch.Tensor
    grown: torch.Tensor
    ablated: torch.Tensor
    k: int | None
    n_prune: int


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Active inputs per neuron of a bool [n_out, ...] mask (int64 [n_out]).

    Summing the uint8 view is ~10x faster than summing bools, which torch converts element by element.
    """
    return mask.reshape(mask.shape[0], -1).view(torch.uint8).sum(dim=1, dtype=torch.int32).long()


def random_fan_in_mask(n_out: int, fan_in: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Each neuron gets exactly k distinct inputs drawn uniformly at random (SRIGL_SPEC §2.4, step 1)."""
    if not 1 <= k <= fan_in:
        raise ValueError(f"k={k} must lie in [1, fan_in={fan_in}]")
    # The k largest of i.i.d. uniforms form a uniformly random k-subset; topk keeps only [n_out, k] indices.
    chosen = torch.rand(n_out, fan_in, generator=generator).topk(k, dim=1).indices
    return torch.zeros(n_out, fan_in, dtype=torch.bool).scatter_(1, chosen, True)


def top_n_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest entries over the whole layer (never a -inf entry; fewer if fewer are finite).

    O(N): a k-th value selection gives the threshold; ties at the threshold go to the lowest flat indices, which
    is exactly what a stable descending sort would pick, without its O(N log N) time and int64 index memory.
    """
    flat = scores.reshape(-1)
    valid = flat > NEG_INF
    n_valid = int(torch.count_nonzero(valid))
    n = min(n, n_valid)
    if n <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    # Drop scores are finite only at active positions (~10% of a 90% sparse layer): select among those.
    candidates = flat if n_valid == flat.numel() else flat[valid]
    threshold = candidates.kthvalue(candidates.numel() - n + 1).values
    mask = flat > threshold
    missing = n - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask.view(scores.shape)


def top_per_row_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row i, the counts[i] largest entries of scores[i] (counts may differ per row).

    A row-wise top-k with k = max(counts), then the first counts[i] of each row: cheap because counts <= k, a
    small fraction of the fan-in. Ties are broken deterministically by torch.topk.
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    width = int(counts.max()) if counts.numel() else 0
    if width <= 0:
        return mask
    order = scores.topk(width, dim=1, sorted=True).indices
    take = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    return mask.scatter_(1, order, take)


def ablation_threshold(gamma_sal: float, k0: int) -> int:
    """tau = max(1, floor(gamma_sal * k0)); gamma_sal >= 1 is an absolute count of salient weights."""
    return int(gamma_sal) if gamma_sal >= 1 else max(1, math.floor(gamma_sal * k0))


def neurons_to_ablate(
    scores: LayerScores, n_keep: int, n_prune: int, budget: int, gamma_sal: float
) -> torch.Tensor:
    """SRigL's dynamic ablation (SRIGL_SPEC §2.6 step 3). Returns a bool [n_out]; recomputed from scratch each
    update, so a neuron whose saliency recovers is revived.

    Step 1. Salient positions: the n_keep largest |W| (those that would survive magnitude pruning) OR the n_prune
            largest |dense grad| over all positions.
    Step 2. tau from gamma_sal and k0 = floor(budget / n_out), the fan-in without ablation.
    Step 3. Safety clamp: at least m_min + 1 neurons, m_min = floor(budget / fan_in), must survive so that the
            survivors can hold the budget with k <= fan_in; lower tau to the salient count of the neuron ranked
            m_min if needed.
    Step 4. Ablate neurons with fewer than tau salient positions.
    """
    n_out, fan_in = scores.drop.shape
    m_min = budget // fan_in
    if m_min >= n_out:  # a dense layer has no room to hand budget to anyone
        return torch.zeros(n_out, dtype=torch.bool)
    salient = top_n_mask(scores.drop, n_keep) | top_n_mask(scores.grow, n_prune)
    counts = row_counts(salient)
    tau = ablation_threshold(gamma_sal, budget // n_out)
    tau = min(tau, int(counts.sort(descending=True).values[m_min]))
    return counts < tau


def srigl_select(
    mask: torch.Tensor,
    scores: LayerScores,
    budget: int,
    drop_fraction: float,
    *,
    ablation: bool,
    gamma_sal: float,
) -> Selection:
    """One SRigL update of one layer (SRIGL_SPEC §2.6 steps 2-8).

    Prune layer-wise by |W| (ablated neurons lose everything), cap every neuron at its top-k by magnitude, then
    regrow each surviving neuron to exactly k by |dense grad| among positions not kept.
    """
    n_out, fan_in = mask.shape
    n_ones = int(torch.count_nonzero(mask))
    n_keep = n_ones - math.floor(n_ones * drop_fraction)
    # Active weights that are exactly 0 (grown at 0, their gradient 0 since) are never kept by a tie-break: the drop
    # keeps non-zeros only, and the rest of the budget is regrown by gradient (SRIGL_SPEC §2.6 step 2).
    n_keep = min(n_keep, int(torch.count_nonzero(scores.drop > 0)))
    n_prune = n_ones - n_keep
    if ablation:
        ablated = neurons_to_ablate(scores, n_keep, n_prune, budget, gamma_sal)
    else:
        ablated = torch.zeros(n_out, dtype=torch.bool)
    k = constant_fan_in(budget, n_out - int(torch.count_nonzero(ablated)))
    if k > fan_in:
        raise InvariantError(f"fan-in after ablation k={k} exceeds the dense fan-in {fan_in}")
    drop = scores.drop.masked_fill(ablated.unsqueeze(1) | (scores.drop == 0), NEG_INF)
    kept = top_n_mask(drop, n_keep)
    # Where ablation shrank k, a neuron may keep more than k: keep its k largest magnitudes.
    kept &= top_per_row_mask(drop.masked_fill(~kept, NEG_INF), torch.full((n_out,), k))
    need = torch.where(ablated, 0, k - row_counts(kept))
    grown = top_per_row_mask(scores.grow.masked_fill(kept, NEG_INF), need)
    selection = Selection(kept | grown, kept, grown, ablated, k, n_prune)
    _check_srigl(selection, mask, budget)
    return selection


def unstructured_select(mask: torch.Tensor, scores: LayerScores, drop_fraction: float) -> Selection:
    """RigL (grow by |dense grad|) or SET (grow by random scores): layer-wise prune and regrow n_prune weights."""
    n_ones = int(torch.count_nonzero(mask))
    n_prune = math.floor(n_ones * drop_fraction)
    kept = top_n_mask(scores.drop, n_ones - n_prune)
    grown = top_n_mask(scores.grow.masked_fill(kept, NEG_INF), n_prune)
    new_mask = kept | grown
    selection = Selection(new_mask, kept, grown, row_counts(new_mask) == 0, None, n_prune)
    _check_common(selection, mask)
    if int(torch.count_nonzero(new_mask)) != n_ones:
        raise InvariantError(f"unstructured update changed the non-zero count {n_ones} -> "
                             f"{int(torch.count_nonzero(new_mask))}")
    return selection


def _check_common(selection: Selection, old_mask: torch.Tensor) -> None:
    if (selection.kept & ~old_mask).any():
        raise InvariantError("the drop step kept a position that was not active")
    if (selection.kept & selection.grown).any():
        raise InvariantError("the grow step chose a position that was already kept (drop and grow must be disjoint)")


def _check_srigl(selection: Selection, old_mask: torch.Tensor, budget: int) -> None:
    _check_common(selection, old_mask)
    check_constant_fan_in(selection.new_mask, k=selection.k, ablated=selection.ablated)
    nnz = int(torch.count_nonzero(selection.new_mask))
    if nnz > budget:
        raise InvariantError(f"{nnz} non-zeros exceed the layer budget {budget}")


def check_constant_fan_in(
    mask: torch.Tensor, *, k: int | None = None, ablated: torch.Tensor | None = None, layer: str = "layer"
) -> tuple[int, torch.Tensor]:
    """Check that every active neuron of a neuron-view mask has the same fan-in; return (k, ablated [n_out]).

    Raises InvariantError naming the layer if active neurons differ, if k differs from the expected one, or if
    the neurons with no inputs differ from the expected ablated set.
    """
    counts = row_counts(mask)
    no_inputs = counts == 0
    active_counts = counts[~no_inputs].unique()
    if active_counts.numel() > 1:
        raise InvariantError(f"{layer}: active neurons have different fan-ins {active_counts.tolist()}")
    found_k = int(active_counts[0]) if active_counts.numel() else 0
    if k is not None and found_k != k and active_counts.numel():
        raise InvariantError(f"{layer}: active neurons have fan-in {found_k}, expected k={k}")
    if ablated is not None and not torch.equal(no_inputs, ablated):
        raise InvariantError(f"{layer}: neurons with no inputs {no_inputs.nonzero().flatten().tolist()} "
                             f"differ from the ablated set {ablated.nonzero().flatten().tolist()}")
    return found_k, no_inputs
