"""The C++ CPU selection's code paths against the reference, bit for bit: the small-k anchor list and the radix
select for larger k (several passes, few candidates counted directly), ties across the threshold, NaN, +-inf,
-0.0, subnormals, tokens excluded from the register ranking, rows of any length."""

import pytest
import torch

from conftest import has_cpp_kernel
from hiprune_ops import reference as ref

pytestmark = pytest.mark.skipif(not has_cpp_kernel("select_with_roles", "cpu"),
                                reason="hiprune::select_with_roles has no CPU kernel in this build")

SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3.4e38, -3.4e38]


def assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha, neighborhood="cross", official=False):
    args = (budget, grid_h, grid_w, alpha, 0, neighborhood, official)
    try:
        expected = ref.select_with_roles(obj, deep, *args)
    except ValueError as error:  # official overflow: the kernel must raise the same
        with pytest.raises(ValueError, match="more than budget"):
            torch.ops.hiprune.select_with_roles(obj, deep, *args)
        return str(error)
    idx, roles = torch.ops.hiprune.select_with_roles(obj, deep, *args)
    assert torch.equal(idx, expected[0]), args
    assert torch.equal(roles, expected[1]), args
    assert torch.equal(torch.ops.hiprune.select(obj, deep, *args), expected[0]), args
    return None


def specials(batch, n, generator, numbers=0.5):
    """Special values, with a share of random numbers of any sign and magnitude."""
    pick = torch.randint(len(SPECIALS), (batch, n), generator=generator)
    values = torch.tensor(SPECIALS)[pick]
    numbers_mask = torch.rand(batch, n, generator=generator) < numbers
    spread = torch.randn(batch, n, generator=generator) * torch.exp2(torch.randint(-140, 120, (batch, n),
                                                                                    generator=generator).float())
    return torch.where(numbers_mask, spread, values)


GRIDS = [(1, 1), (1, 2), (3, 1), (2, 2), (5, 7), (7, 9), (1, 65), (3, 43), (13, 13), (24, 24)]


def budgets_for(n):
    return sorted({b for b in (1, 2, n // 3, n // 2, n - 1, n) if 1 <= b <= n})


@pytest.mark.parametrize("kind", ["all equal", "few values", "specials", "shuffled steps"])
def test_ties_and_special_values(kind):
    g = torch.Generator().manual_seed(1)
    for grid_h, grid_w in GRIDS:
        n = grid_h * grid_w
        if kind == "all equal":
            obj, deep = torch.full((3, n), 0.25), torch.full((3, n), -0.0)
            deep[1] = float("nan")
            deep[2] = float("-inf")
        elif kind == "few values":
            obj = torch.randint(3, (3, n), generator=g).float()
            deep = torch.randint(2, (3, n), generator=g).float() - 0.5
        elif kind == "specials":
            obj, deep = specials(3, n, g), specials(3, n, g)
        else:  # equal runs spread over the row, so the threshold falls inside a run
            obj = (torch.randperm(n, generator=g) // 5).float().expand(3, n).contiguous()
            deep = (torch.randperm(n, generator=g) // 7).float().expand(3, n).contiguous()
        for budget in budgets_for(n):
            for alpha in (0.0, 0.1, 1.0):
                assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha)
                assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha, "square")
                assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha, official=True)


def test_many_anchors_take_the_radix_path():
    # More anchors than the sorted-list path keeps: the anchors come from the radix select too.
    g = torch.Generator().manual_seed(2)
    for grid_h, grid_w, budget in [(24, 24, 576), (24, 24, 300), (40, 41, 1000), (64, 64, 4096)]:
        n = grid_h * grid_w
        obj = torch.rand(2, n, generator=g)
        obj[1] = torch.randint(4, (n,), generator=g).float()  # ties at the anchor threshold
        deep = specials(2, n, g)
        for alpha in (0.5, 1.0):
            assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha)
            assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha, "square")


def test_anchors_and_buffers_fill_the_budget():
    # No register is left: two interior anchors with their 4 (cross) or 8 (square) neighbours are the budget.
    grid_h, grid_w = 6, 7
    n = grid_h * grid_w
    obj = torch.zeros(2, n)
    obj[:, 1 * grid_w + 1] = 2.0
    obj[:, 4 * grid_w + 5] = 1.0
    obj[1, 4 * grid_w + 5] = 2.0  # tied anchors
    deep = torch.rand(2, n, generator=torch.Generator().manual_seed(3))
    assert assert_matches_reference(obj, deep, 10, grid_h, grid_w, 1.0) is None
    assert assert_matches_reference(obj, deep, 18, grid_h, grid_w, 1.0, "square") is None
    assert assert_matches_reference(obj, deep, 10, grid_h, grid_w, 1.0, official=True) is None
    # Official mode's flattened, clamped neighbours: an anchor at token 0 keeps fewer tokens, registers fill in.
    corner = obj.clone()
    corner[:, 0] = 3.0
    assert assert_matches_reference(corner, deep, 10, grid_h, grid_w, 1.0, official=True) is None
    # Official mode has no anchor cap: 3 anchors and their 12 buffers exceed a budget of 13, an error.
    third = obj.clone()
    third[:, 2 * grid_w + 4] = 1.5
    assert "more than budget" in assert_matches_reference(third, deep, 13, grid_h, grid_w, 1.0, official=True)


def test_scores_that_need_several_radix_passes():
    # Ranks equal but for their lowest bits, among far larger and far smaller ones: every digit is resolved.
    n = 30 * 30
    base = torch.full((n,), 0.75)
    steps = torch.arange(n, dtype=torch.int32) % 300
    close = (base.view(torch.int32) + steps).view(torch.float32)  # consecutive floats above 0.75
    deep = torch.stack([close, torch.where(steps % 2 == 0, close, -close), close.flip(0)])
    deep[2, :100] = 1e30
    deep[2, 100:200] = -1e-30
    obj = deep.flip(1).contiguous()
    for budget in (1, 20, 200, 450, 899, 900):
        for alpha in (0.0, 0.1, 1.0):
            assert_matches_reference(obj, deep, budget, 30, 30, alpha)


def test_excluded_tokens_share_the_lowest_digit():
    # Kept tokens leave the register ranking with the lowest rank, below NaN; with only NaN and -inf left among
    # the others, the registers come from the same lowest digit as the excluded tokens.
    n = 12 * 12
    obj = torch.rand(2, n, generator=torch.Generator().manual_seed(4))
    deep = torch.full((2, n), float("nan"))
    deep[0, ::3] = float("-inf")
    deep[1, 5::7] = -3.4e38
    for budget in (40, 100, n):
        assert_matches_reference(obj, deep, budget, 12, 12, 1.0)
        assert_matches_reference(obj, deep, budget, 12, 12, 0.2, "square")


def test_random_problems():
    g = torch.Generator().manual_seed(5)
    for trial in range(16):
        batch = int(torch.randint(1, 65 if trial % 4 == 0 else 9, (1,), generator=g))  # the reference is slow at B=64
        grid_h = int(torch.randint(1, 65, (1,), generator=g))
        grid_w = int(torch.randint(1, 4096 // grid_h + 1, (1,), generator=g))
        n = grid_h * grid_w
        budget = int(torch.randint(1, n + 1, (1,), generator=g))
        alpha = float(torch.rand(1, generator=g))
        kind = trial % 4
        if kind == 0:
            obj, deep = torch.rand(batch, n, generator=g), torch.rand(batch, n, generator=g)
        elif kind == 1:  # attention-like: positive, spread over many binades
            obj = torch.softmax(torch.randn(batch, n, generator=g) * 3, -1)
            deep = torch.softmax(torch.randn(batch, n, generator=g) * 3, -1)
        elif kind == 2:
            obj = torch.randint(8, (batch, n), generator=g).float()
            deep = torch.randint(8, (batch, n), generator=g).float()
        else:
            obj, deep = specials(batch, n, g, numbers=0.9), specials(batch, n, g, numbers=0.9)
        neighborhood = "square" if trial % 3 == 0 else "cross"
        official = trial % 5 == 0 and neighborhood == "cross"
        assert_matches_reference(obj, deep, budget, grid_h, grid_w, alpha, neighborhood, official)
        assert_matches_reference(obj, deep, max(1, budget // 4), grid_h, grid_w, 0.1)
