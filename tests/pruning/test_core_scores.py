"""Score functions and allocation rules against hand-computed cases."""
import pytest
import torch

from mflightning.pruning import compute_masks
from mflightning.pruning.allocation import global_masks, kth_smallest, pooled_ratios, row_masks
from mflightning.pruning.scores import lamp_scores, magnitude_scores, multiflow_scores, snip_scores, wanda_scores


def test_multiflow_score_matches_hand_computation():
    # |W| * a = [[1, 4], [3, 0]]; S_in = column means [2, 2]; S_out = row means [2.5, 1.5]
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    norms = torch.tensor([1.0, 2.0])
    expected = torch.tensor([[2.5 * 1 * 2, 2.5 * 2 * 2], [1.5 * 3 * 2, 0.0]])
    assert torch.allclose(multiflow_scores(weight, norms), expected)


def test_multiflow_score_does_not_change_the_weight_and_ignores_norm_scale():
    weight = torch.randn(5, 7)
    before = weight.clone()
    norms = torch.rand(7)
    a = multiflow_scores(weight, norms)
    b = multiflow_scores(weight, 3.0 * norms)
    assert torch.equal(weight, before)
    # a constant scale of the norms scales every score by the same factor: same ranking
    assert torch.equal(a.flatten().argsort(), b.flatten().argsort())


def test_lamp_wanda_snip_scores_by_hand():
    # w^2 = [1, 4, 9]; suffix sums [14, 13, 9]
    lamp = lamp_scores(torch.tensor([[3.0, -1.0, 2.0]]))
    assert torch.allclose(lamp, torch.tensor([[1.0, 1 / 14, 4 / 13]]))
    wanda = wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 0.5]))
    assert torch.allclose(wanda, torch.tensor([[3.0, 1.0]]))
    snip = snip_scores(torch.tensor([[2.0, -1.0]]), torch.tensor([[-0.5, 4.0]]))
    assert torch.allclose(snip, torch.tensor([[1.0, 4.0]]))
    assert torch.equal(magnitude_scores(torch.tensor([-1.5, 2.0])), torch.tensor([1.5, 2.0]))


def test_kth_smallest_and_ties_are_pruned():
    values = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert kth_smallest(values, 2).item() == 2.0
    assert kth_smallest(values, 0).item() == float("-inf")
    masks = global_masks({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
    # k = 2 -> threshold 2: both entries equal to 2 are pruned, so realised sparsity 3/4 > 1/2
    assert masks["a"].tolist() == [False, False] and masks["b"].tolist() == [False, True]


def _two_group_case():
    magnitudes = {
        "A1": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "A2": torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
        "B1": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
    }
    groups = {"A1": "a", "A2": "a", "B1": "b"}
    return magnitudes, groups


def test_modality_ratios_pool_each_group_separately():
    magnitudes, groups = _two_group_case()
    # group a: 8 weights, k = 4, threshold 4 -> A1 fully pruned, A2 dense; group b: k = 2, threshold 0.2
    assert pooled_ratios(magnitudes, groups, 0.5) == {"A1": 4, "A2": 0, "B1": 2}


def test_magnitude_ratios_use_one_pool_for_all_groups():
    magnitudes, _ = _two_group_case()
    one = {name: "all" for name in magnitudes}
    # 12 weights, k = 6: sorted 0.1 0.2 0.3 0.4 1 2 -> threshold 2
    assert pooled_ratios(magnitudes, one, 0.5) == {"A1": 2, "A2": 0, "B1": 4}


def test_modality_allocation_prunes_by_score_within_each_layer():
    magnitudes, groups = _two_group_case()
    scores = {
        "A1": torch.tensor([[4.0, 3.0], [2.0, 1.0]]),
        "A2": torch.ones(2, 2),
        "B1": torch.tensor([[4.0, 3.0], [2.0, 1.0]]),  # ranking opposite to magnitude
    }
    masks = compute_masks(scores, 0.5, "modality", groups=groups, magnitudes=magnitudes)
    assert masks["A1"].sum() == 0
    assert masks["A2"].all()
    assert masks["B1"].tolist() == [[True, True], [False, False]]
    # "w/o multimodality": A1 prunes its 2 lowest scores, B1 all 4
    masks = compute_masks(scores, 0.5, "magnitude", groups=groups, magnitudes=magnitudes)
    assert masks["A1"].tolist() == [[True, True], [False, False]]
    assert masks["B1"].sum() == 0


def test_row_allocation_prunes_each_row_equally():
    scores = {"w": torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 8.0, 7.0, 6.0]])}
    masks = row_masks(scores, 0.5)
    assert masks["w"].tolist() == [[False, True, True, False], [True, True, False, False]]


def test_unknown_allocation_is_rejected():
    with pytest.raises(ValueError, match="unknown allocation 'nope'"):
        compute_masks({"w": torch.ones(2, 2)}, 0.5, "nope")


def test_multiflow_by_hand_on_a_case_where_every_factor_changes_the_mask():
    # |W| * a = [[4, 1.5, 12], [2, 6, 4]]: S_in = column means [3, 3.75, 8], S_out = row means [35/6, 4]
    weight = torch.tensor([[2.0, -0.5, 3.0], [-1.0, 2.0, 1.0]])
    norms = torch.tensor([2.0, 3.0, 4.0])
    s_out, s_in = torch.tensor([35 / 6, 4.0]), torch.tensor([3.0, 3.75, 8.0])
    expected = s_out[:, None] * weight.abs() * s_in[None]
    assert torch.allclose(expected, torch.tensor([[35.0, 10.9375, 140.0], [12.0, 30.0, 32.0]]))
    scores = multiflow_scores(weight, norms)
    assert torch.allclose(scores, expected)
    keep_half = lambda s: s > kth_smallest(s, 3)  # noqa: E731  (prune 3 of 6, as in masks_from_counts)
    assert keep_half(scores).tolist() == [[True, False, True], [False, False, True]]
    # the case is asymmetric enough that dropping any factor, or squaring the norm, keeps another half
    m = weight.abs()
    for ablated in (m, m * norms, s_out[:, None] * m, m * s_in[None], s_out[:, None] * s_in[None] + 0 * m,
                    multiflow_scores(weight, norms.square())):
        assert not torch.equal(keep_half(ablated), keep_half(scores))
