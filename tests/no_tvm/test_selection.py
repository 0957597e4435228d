"""SRigL / RigL / SET selection maths (SRIGL_SPEC §2.4, §2.6-2.7): properties over random layers, and hand-built
cases whose right answer is known."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import InvariantError
from srigl_compile.sparsity import (
    LayerScores,
    check_constant_fan_in,
    magnitude_drop_scores,
    neurons_to_ablate,
    random_fan_in_mask,
    srigl_select,
    unstructured_select,
)
from srigl_compile.sparsity.selection import ablation_threshold, top_n_mask, top_per_row_mask


@st.composite
def layers(draw):
    n_out, fan_in = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    k = draw(st.integers(1, fan_in))
    budget = draw(st.integers(n_out * k, n_out * min(fan_in, k + 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = random_fan_in_mask(n_out, fan_in, k, g)
    weight = torch.randn(n_out, fan_in, generator=g) * mask
    # Some neurons get tiny weights and no gradient, so ablation has something to find.
    weak = torch.rand(n_out, generator=g) < draw(st.floats(0, 0.6))
    weight[weak] *= 1e-3
    # Some active weights exactly 0 (grown at 0, no gradient since): the drop keeps only non-zeros.
    weight[torch.rand(n_out, fan_in, generator=g) < draw(st.sampled_from([0.0, 0.0, 0.3, 0.8]))] = 0.0
    grad = torch.randn(n_out, fan_in, generator=g).abs() * (~weak).unsqueeze(1)
    return mask, weight, grad, budget


@settings(max_examples=300, deadline=None)
@given(layers(), st.floats(0.0, 1.0), st.booleans(), st.sampled_from([0.0, 0.3, 0.95, 2.0]))
def test_srigl_select_invariants(layer, drop_fraction, ablation, gamma_sal):
    mask, weight, grad, budget = layer
    scores = LayerScores(magnitude_drop_scores(weight, mask), grad)
    sel = srigl_select(mask, scores, budget, drop_fraction, ablation=ablation, gamma_sal=gamma_sal)
    n_out, fan_in = mask.shape
    alive = ~sel.ablated
    assert int(alive.sum()) >= 1
    assert sel.k == budget // int(alive.sum()) and 1 <= sel.k <= fan_in
    counts = sel.new_mask.sum(dim=1)
    assert torch.all(counts[alive] == sel.k)
    assert torch.all(counts[sel.ablated] == 0)
    assert int(sel.new_mask.sum()) <= budget
    assert not (sel.kept & ~mask).any(), "drop keeps only active positions"
    assert not (sel.kept & (weight == 0)).any(), "drop keeps only non-zero weights"
    assert not (sel.kept & sel.grown).any(), "drop and grow are disjoint"
    assert torch.equal(sel.new_mask, sel.kept | sel.grown)
    n_ones, nonzero = int(mask.sum()), int(torch.count_nonzero(weight * mask))
    assert sel.n_prune == n_ones - min(n_ones - math.floor(n_ones * drop_fraction), nonzero)
    if not ablation:
        assert not sel.ablated.any()


@settings(max_examples=200, deadline=None)
@given(layers(), st.floats(0.0, 1.0))
def test_unstructured_select_conserves_the_count(layer, drop_fraction):
    mask, weight, grad, _ = layer
    sel = unstructured_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), drop_fraction)
    assert int(sel.new_mask.sum()) == int(mask.sum())
    assert not (sel.kept & ~mask).any() and not (sel.kept & sel.grown).any()
    assert int(sel.kept.sum()) == int(mask.sum()) - sel.n_prune


@given(st.integers(1, 30), st.integers(1, 50), st.data())
def test_random_fan_in_mask_has_exactly_k_distinct_inputs_per_neuron(n_out, fan_in, data):
    k = data.draw(st.integers(1, fan_in))
    seed = data.draw(st.integers(0, 1000))
    mask = random_fan_in_mask(n_out, fan_in, k, torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool and torch.all(mask.sum(dim=1) == k)
    again = random_fan_in_mask(n_out, fan_in, k, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


def test_random_fan_in_mask_rejects_bad_k():
    with pytest.raises(ValueError):
        random_fan_in_mask(3, 4, 0, torch.Generator())
    with pytest.raises(ValueError):
        random_fan_in_mask(3, 4, 5, torch.Generator())


def hand_layer():
    # 3 neurons x 6 inputs, k = 2, budget 6.
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    weight = torch.tensor([[5.0, 0.1, 0, 0, 0, 0], [0, 0, 4.0, 3.0, 0, 0], [0, 0, 0, 0, 2.0, 6.0]])
    grad = torch.tensor([[0, 0, 0, 0.9, 0.2, 0], [0.5, 0, 0, 0, 0, 0.1], [0.3, 0.8, 0, 0, 0, 0]])
    return mask, weight, grad


def test_hand_built_prune_drops_smallest_magnitude_and_grow_restores_fan_in_by_gradient():
    mask, weight, grad = hand_layer()
    scores = LayerScores(magnitude_drop_scores(weight, mask), grad)
    # 6 active, drop fraction 1/6 -> prune exactly 1: the 0.1 weight of neuron 0.
    sel = srigl_select(mask, scores, budget=6, drop_fraction=1 / 6, ablation=False, gamma_sal=0.3)
    assert sel.n_prune == 1 and sel.k == 2
    assert not sel.kept[0, 1] and sel.kept.sum() == 5
    # Neuron 0 regrows the input with the largest gradient among those it does not keep: column 3 (0.9).
    assert sel.grown.nonzero().tolist() == [[0, 3]]
    expected = mask.clone()
    expected[0, 1], expected[0, 3] = False, True
    assert torch.equal(sel.new_mask, expected)


def test_hand_built_active_zero_weights_are_dropped_not_kept_by_a_tie_break():
    """SRIGL_SPEC §2.6 step 2: with fewer non-zeros than n_keep, keep the non-zeros and regrow the rest by
    gradient. A probe found the zeros (a weight grown at 0 whose gradient stayed 0) kept by flat index instead,
    while a free position with a larger gradient stayed off."""
    mask, weight, grad = hand_layer()
    weight[0, 1] = weight[1, 3] = 0.0  # active, but 0: 4 non-zeros of 6 active
    grad[1] = torch.tensor([0.5, 0, 0, 0, 0.7, 0.1])
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), 6, 0.0,
                       ablation=False, gamma_sal=0.3)
    assert sel.n_prune == 2 and sel.kept.sum() == 4 and not sel.kept[0, 1] and not sel.kept[1, 3]
    # Each neuron regrows by gradient among what it does not keep: neuron 0 column 3 (0.9), neuron 1 column 4 (0.7).
    assert sel.grown.nonzero().tolist() == [[0, 3], [1, 4]]
    # The same position wins back its place when its gradient is the largest.
    grad[0, 1] = 2.0
    again = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), 6, 0.0,
                         ablation=False, gamma_sal=0.3)
    assert again.grown[0, 1] and not again.kept[0, 1]


def test_hand_built_just_dropped_position_can_be_regrown():
    mask, weight, grad = hand_layer()
    grad[0] = torch.tensor([0, 9.0, 0, 0, 0, 0])  # the dropped position has the largest gradient
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), 6, 1 / 6,
                       ablation=False, gamma_sal=0.3)
    assert sel.grown[0, 1] and torch.equal(sel.new_mask, mask)


def test_hand_built_ablation_hands_budget_to_survivors_and_revives():
    # 4 neurons x 8 inputs, k0 = 2 (budget 8). Neuron 3 has tiny weights and no gradient: not salient.
    n_out, fan_in = 4, 8
    mask = torch.zeros(n_out, fan_in, dtype=torch.bool)
    for i in range(n_out):
        mask[i, 2 * i:2 * i + 2] = True
    weight = torch.where(mask, torch.tensor(1.0), torch.tensor(0.0))
    weight[3] *= 1e-4
    grad = torch.zeros(n_out, fan_in)
    grad[:3, :] = torch.linspace(0.1, 0.8, fan_in)
    scores = LayerScores(magnitude_drop_scores(weight, mask), grad)
    # drop 2 of 8: the two weights of neuron 3 would go, so it has 0 salient positions < tau = max(1, 0.3*2) = 1.
    sel = srigl_select(mask, scores, budget=8, drop_fraction=0.25, ablation=True, gamma_sal=0.3)
    assert sel.ablated.tolist() == [False, False, False, True]
    assert sel.k == 8 // 3 == 2 and int(sel.new_mask.sum()) == 6
    # Next update: neuron 3 gets large gradients again -> revived with k inputs, k back to 2 for everyone.
    grad2 = torch.zeros(n_out, fan_in)
    grad2[3] = 5.0
    sel2 = srigl_select(sel.new_mask, LayerScores(magnitude_drop_scores(weight * sel.new_mask, sel.new_mask), grad2),
                        budget=8, drop_fraction=0.25, ablation=True, gamma_sal=0.3)
    assert not sel2.ablated.any() and sel2.k == 2 and int(sel2.new_mask[3].sum()) == 2


def test_hand_built_cap_keeps_top_k_by_magnitude_when_k_shrinks():
    # Budget 6 over 3 neurons; neuron 2 was ablated (k = 3) and revives, so k shrinks to 2.
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[3.0, 1.0, 2.0, 0], [0.5, 4.0, 6.0, 0], [0, 0, 0, 0]])
    grad = torch.tensor([[0, 0, 0, 0.0], [0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]])
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), 6, 0.0,
                       ablation=False, gamma_sal=0.3)
    assert sel.k == 2
    assert sel.new_mask.tolist() == [[True, False, True, False], [False, True, True, False], [False, False, True, True]]


def test_safety_clamp_keeps_enough_neurons_to_hold_the_budget():
    # Budget 12 over 4 neurons of fan-in 4: at least floor(12/4)+1 = 4 neurons must survive, even if none is salient.
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :3] = True
    weight = torch.full((4, 4), 1e-6) * mask
    grad = torch.zeros(4, 4)
    scores = LayerScores(magnitude_drop_scores(weight, mask), grad)
    ablated = neurons_to_ablate(scores, n_keep=9, n_prune=3, budget=12, gamma_sal=0.95)
    assert int((~ablated).sum()) >= 12 // 4


def test_ablation_threshold():
    assert ablation_threshold(0.3, 10) == 3
    assert ablation_threshold(0.3, 2) == 1
    assert ablation_threshold(0.0, 50) == 1
    assert ablation_threshold(5, 50) == 5


def test_rigl_grows_highest_gradients_and_set_uses_given_scores():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[1.0, 2.0, 0, 0]])
    grad = torch.tensor([[0.0, 0.0, 0.1, 0.7]])
    sel = unstructured_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grad), 0.5)
    assert sel.new_mask.tolist() == [[False, True, False, True]]


def test_top_n_never_picks_minus_inf_and_top_per_row_takes_variable_counts():
    scores = torch.tensor([[3.0, float("-inf")], [1.0, 2.0]])
    assert top_n_mask(scores, 10).tolist() == [[True, False], [True, True]]
    assert top_per_row_mask(scores, torch.tensor([0, 1])).tolist() == [[False, False], [False, True]]


def test_check_constant_fan_in_raises_on_violation():
    ok = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    assert check_constant_fan_in(ok)[0] == 2
    with pytest.raises(InvariantError, match="different fan-ins"):
        check_constant_fan_in(torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool), layer="fc")
    with pytest.raises(InvariantError, match="expected k=3"):
        check_constant_fan_in(ok, k=3)
    with pytest.raises(InvariantError, match="ablated"):
        check_constant_fan_in(ok, ablated=torch.tensor([False, False, False]))


def test_the_drop_keeps_the_largest_magnitudes_whatever_their_sign():
    """Every hand-built case had positive weights: a mutation probe's drop by signed W passed them all."""
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    weight = torch.tensor([[-5.0, 0.1, 2.0, 0.0]])
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), torch.tensor([[0.0, 0, 0, 1]])), 3,
                       1 / 3, ablation=False, gamma_sal=0.3)
    assert sel.kept.tolist() == [[True, False, True, False]], "the 0.1 weight goes, the -5 weight stays"


def test_the_grow_takes_the_largest_gradient_magnitude_whatever_its_sign():
    from srigl_compile.sparsity import gradient_grow_scores

    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[3.0, 0.1, 0.0, 0.0]])
    grow = gradient_grow_scores(torch.tensor([[0.0, 0.0, -9.0, 0.5]]), "layer")
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), grow), 2, 0.5, ablation=False,
                       gamma_sal=0.3)
    assert sel.grown.tolist() == [[False, False, True, False]]


def test_gamma_sal_of_one_is_a_count_of_one_salient_weight():
    """gamma_sal >= 1 is an absolute count (SRIGL_SPEC §2.6 step 3): a mutant reading 1.0 as the fraction 1 (tau
    = k0) passed every test."""
    assert ablation_threshold(1.0, 50) == 1 and ablation_threshold(1, 7) == 1
    assert ablation_threshold(0.3, 5) == 1 and ablation_threshold(0.5, 7) == 3  # (floors: 1.5, 3.5)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :4] = True
    weight = torch.ones(4, 8) * mask
    weight[3, :2] = 1e-4  # neuron 3: 2 of its 4 weights salient, which a count of 1 keeps
    sel = srigl_select(mask, LayerScores(magnitude_drop_scores(weight, mask), torch.zeros(4, 8)), 16, 2 / 16,
                       ablation=True, gamma_sal=1.0)
    assert not sel.ablated.any()


def test_top_n_ties_go_to_the_lowest_flat_indices():
    assert top_n_mask(torch.tensor([[1.0, 1.0], [1.0, 0.5]]), 2).tolist() == [[True, True], [False, False]]
