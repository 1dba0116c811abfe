"""The torch reference against hand-worked cases, the spec's invariants and the restatement of the authors' release
(hiprune_ops/published.py, which the benchmarks use too)."""

import pytest
import torch

from conftest import ANCHOR, BUFFER, REGISTER, assert_selection_invariants, random_maps, random_scores
from hiprune_ops import published
from hiprune_ops import reference as ref
from hiprune_ops._validation import anchor_count


def one_hot_scores(n, best, batch=1):
    """Scores with a strict order: `best` tokens first (in the given order), the rest below, all distinct."""
    scores = torch.linspace(0.1, 0.2, n).flip(0).repeat(batch, 1)
    for rank, token in enumerate(best):
        scores[:, token] = 1.0 - 0.01 * rank
    return scores


def test_center_anchor_takes_its_cross():
    obj = one_hot_scores(9, [4])
    idx, roles = ref.select_with_roles(obj, obj, budget=5, grid_h=3, grid_w=3, alpha=1.0)
    assert idx.tolist() == [[1, 3, 4, 5, 7]]
    assert roles.tolist() == [[BUFFER, BUFFER, ANCHOR, BUFFER, BUFFER]]


def test_corner_anchor_keeps_on_grid_neighbours_and_fills_with_registers():
    obj = one_hot_scores(9, [0])
    deep = one_hot_scores(9, [8, 5, 2])
    idx, roles = ref.select_with_roles(obj, deep, budget=5, grid_h=3, grid_w=3, alpha=1.0)
    assert idx.tolist() == [[0, 1, 3, 5, 8]]
    assert roles.tolist() == [[ANCHOR, BUFFER, BUFFER, REGISTER, REGISTER]]


def test_square_neighbourhood_adds_diagonals():
    obj = one_hot_scores(16, [5])
    idx, roles = ref.select_with_roles(obj, obj, budget=9, grid_h=4, grid_w=4, alpha=1.0, neighborhood="square")
    assert idx.tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10]]
    assert roles[0, 4].item() == ANCHOR and (roles == BUFFER).sum().item() == 8


def test_no_wrap_across_rows_but_official_wraps():
    # Token 3 is the first of row 1 on a 3x3 grid: its left neighbour is off the grid, the release's i - 1 is token 2.
    obj = one_hot_scores(9, [3])
    deep = one_hot_scores(9, [8, 7, 6, 5])
    idx = ref.select(obj, deep, budget=5, grid_h=3, grid_w=3, alpha=1.0)
    assert idx.tolist() == [[0, 3, 4, 6, 8]]  # 3 kept + buffers 0, 4, 6; one register: 8
    idx = ref.select(obj, deep, budget=5, grid_h=3, grid_w=3, alpha=1.0, official=True)
    assert idx.tolist() == [[0, 2, 3, 4, 6]]


def test_anchor_and_neighbour_of_another_anchor_is_an_anchor():
    obj = one_hot_scores(25, [12, 13])
    idx, roles = ref.select_with_roles(obj, obj, budget=10, grid_h=5, grid_w=5, alpha=1.0)
    kept = dict(zip(idx[0].tolist(), roles[0].tolist()))
    assert kept[12] == ANCHOR and kept[13] == ANCHOR
    assert {t for t, r in kept.items() if r == BUFFER} == {7, 8, 11, 14, 17, 18}


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    scores = torch.tensor([[0.5, float("nan"), 0.5, -0.0, 0.0, 0.5, float("nan"), -float("inf")]])
    positions = ref.rank_positions(scores)
    assert positions.tolist() == [[0, 6, 1, 3, 4, 2, 7, 5]]
    idx = ref.select(scores, scores, budget=5, grid_h=1, grid_w=8, alpha=0.0)
    assert idx.tolist() == [[0, 2, 3, 4, 5]]


@pytest.mark.parametrize("budget,alpha,neighborhood,official,expected", [
    (192, 0.1, "cross", False, 4), (128, 0.1, "cross", False, 3), (64, 0.1, "cross", False, 1),
    (5, 1.0, "cross", False, 1), (4, 1.0, "cross", False, 0), (4, 1.0, "cross", True, 1),
    (45, 0.1, "square", False, 0), (45, 1.0, "square", False, 5), (25, 0.5, "cross", False, 2),
    (15, 0.5, "cross", False, 2),  # 1.5 rounds to even 2
    (25, 0.1, "cross", False, 0),  # 0.5 rounds to even 0
])
def test_anchor_count(budget, alpha, neighborhood, official, expected):
    assert anchor_count(budget, alpha, neighborhood, official) == expected


@pytest.mark.parametrize("grid", [(24, 24), (14, 14), (5, 7)])
@pytest.mark.parametrize("budget", [192, 128, 64, 17])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_official_mode_reproduces_the_release(grid, budget, alpha):
    grid_h, grid_w = grid
    n = grid_h * grid_w
    if budget > n:
        pytest.skip("budget above N")
    obj = random_maps(2, 2, n + 1, seed=budget)
    deep = random_maps(2, 2, n + 1, seed=budget + 1)
    obj_scores, deep_scores = ref.attention_scores(obj, 1), ref.attention_scores(deep, 1)
    try:
        expected = published.mask_to_indices(published.select_mask(obj_scores, deep_scores, budget, grid_w, alpha))
    except ValueError as release_error:  # anchors and buffers above the budget: the release fails, we raise
        assert "more than budget" in str(release_error)
        with pytest.raises(ValueError, match="more than budget"):
            ref.select(obj, deep, budget, grid_h, grid_w, alpha, num_prefix=1, official=True)
        return
    assert torch.equal(ref.select(obj, deep, budget, grid_h, grid_w, alpha, num_prefix=1, official=True), expected)


def test_official_overflow_is_a_clear_error():
    obj = one_hot_scores(36, [14])  # an interior anchor keeps 5 tokens; budget 3 rounds to 1 anchor with alpha 1
    with pytest.raises(ValueError, match="official=True keeps 5 anchors and buffers, more than budget 3"):
        ref.select(obj, obj, budget=3, grid_h=6, grid_w=6, alpha=1.0, official=True)


def test_attention_scores_is_the_mean_over_heads_and_all_query_rows():
    attn = random_maps(2, 3, 10, seed=3)
    expected = attn.double()[..., 1:].mean(dim=(1, 2)).float()
    assert torch.equal(ref.attention_scores(attn, num_prefix=1), expected)


def test_qk_reference_equals_the_dense_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.3, dim=-1)
    expected = probs[..., 1:].mean(dim=(1, 2))
    torch.testing.assert_close(ref.qk_scores(q, k, 0.3, num_prefix=1), expected.float(), rtol=1e-6, atol=0)


def test_invariants_on_random_scores():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        grid_h, grid_w = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        n = grid_h * grid_w
        budget = int(torch.randint(1, n + 1, (1,), generator=g))
        alpha = float(torch.rand(1, generator=g))
        neighborhood = "square" if seed % 2 else "cross"
        obj, deep = random_scores(4, n, seed=seed), random_scores(4, n, seed=seed + 100)
        idx, roles = ref.select_with_roles(obj, deep, budget, grid_h, grid_w, alpha, neighborhood=neighborhood)
        assert_selection_invariants(obj, deep, idx, roles, budget, grid_h, grid_w, alpha, neighborhood)
