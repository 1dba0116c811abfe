"""Every op on every backend present, against the torch reference: exact on indices and roles."""

import pytest
import torch

import hiprune_ops
from conftest import assert_selection_invariants, backend_params, random_maps, random_scores
from hiprune_ops import published
from hiprune_ops import reference as ref

GRIDS = [(1, 1), (4, 4), (5, 7), (14, 14), (24, 24)]
INTERPRETER_GRIDS = [(1, 1), (4, 4), (5, 7)]  # the Triton interpreter is slow: small grids only on the CPU


def grids_for(backend, device):
    return INTERPRETER_GRIDS if (backend, device) == ("triton", "cpu") else GRIDS


def budgets_for(n):
    return sorted({b for b in (1, n, 64, 128, 192, max(1, n // 3)) if b <= n})


def independent_scores(t, num_prefix):
    """float32 scores as the ops rank them, not through the reference: maps reduced by a float64 mean, NaN mapped
    below every number (the inputs here hold no -inf)."""
    scores = t.double()[..., num_prefix:].mean(dim=(1, 2)).float() if t.dim() == 4 else t.float()
    return torch.nan_to_num(scores, nan=float("-inf"))


def assert_reference_selection(obj, deep, idx, roles, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official):
    """The reference is the others' truth, so it is checked against what does not share its code: the spec's
    invariants from first principles, or (official=True) the restatement of the authors' release."""
    obj_scores, deep_scores = independent_scores(obj, num_prefix), independent_scores(deep, num_prefix)
    if not official:
        assert_selection_invariants(obj_scores, deep_scores, idx, roles, budget, grid_h, grid_w, alpha, neighborhood)
        return
    # The release ranks by topk, whose order among equal scores is unspecified: distinct finite scores only.
    for scores in (obj_scores, deep_scores):
        assert bool(torch.isfinite(scores).all()), "official cases of the reference need finite scores"
        assert all(len(set(row.tolist())) == row.numel() for row in scores), "official cases need distinct scores"
    mask = published.select_mask(obj_scores, deep_scores, budget, grid_w, alpha)
    assert torch.equal(idx, published.mask_to_indices(mask))


def assert_same_selection(backend, device, obj, deep, budget, grid_h, grid_w, alpha, num_prefix=0,
                          neighborhood="cross", official=False):
    args = (budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official)
    idx, roles = hiprune_ops.select_with_roles(obj.to(device), deep.to(device), *args, backend=backend)
    assert idx.device.type == device
    assert torch.equal(hiprune_ops.select(obj.to(device), deep.to(device), *args, backend=backend), idx)
    if (backend, device) == ("torch", "cpu"):
        assert_reference_selection(obj, deep, idx, roles, *args)
        return
    expected_idx, expected_roles = ref.select_with_roles(obj, deep, *args)
    assert torch.equal(idx.cpu(), expected_idx), args
    assert torch.equal(roles.cpu(), expected_roles), args


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
@pytest.mark.parametrize("neighborhood,official", [("cross", False), ("square", False), ("cross", True)])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_select_on_scores(backend, device, neighborhood, official, alpha):
    for grid_h, grid_w in grids_for(backend, device):
        n = grid_h * grid_w
        for budget in budgets_for(n):
            for batch in (1, 3, 8):
                obj, deep = random_scores(batch, n, seed=budget), random_scores(batch, n, seed=budget + 7)
                try:
                    expected = ref.select(obj, deep, budget, grid_h, grid_w, alpha, 0, neighborhood, official)
                except ValueError:  # official overflow: every backend must raise it too
                    with pytest.raises(ValueError, match="more than budget"):
                        hiprune_ops.select(obj.to(device), deep.to(device), budget, grid_h, grid_w, alpha, 0,
                                           neighborhood, official, backend=backend)
                    continue
                assert expected.shape == (batch, budget)
                assert_same_selection(backend, device, obj, deep, budget, grid_h, grid_w, alpha, 0, neighborhood,
                                      official)


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
@pytest.mark.parametrize("num_prefix", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_select_on_maps(backend, device, num_prefix, dtype):
    for grid_h, grid_w in grids_for(backend, device):
        n = grid_h * grid_w
        batch = 8 if n <= 196 else 2
        obj = random_maps(batch, 2, n + num_prefix, dtype=dtype, seed=n)
        deep = random_maps(batch, 3, n + num_prefix, dtype=dtype, seed=n + 1)
        for budget in budgets_for(n):
            assert_same_selection(backend, device, obj, deep, budget, grid_h, grid_w, 0.1, num_prefix)


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_maps_and_their_scores_select_the_same(backend, device):
    obj, deep = random_maps(3, 2, 50, seed=1), random_maps(3, 2, 50, seed=2)
    from_maps = hiprune_ops.select(obj.to(device), deep.to(device), 20, 7, 7, 0.5, 1, backend=backend)
    from_scores = hiprune_ops.select(ref.attention_scores(obj, 1).to(device), ref.attention_scores(deep, 1).to(device),
                                     20, 7, 7, 0.5, 1, backend=backend)
    assert torch.equal(from_maps, from_scores)


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_non_contiguous_maps(backend, device):
    base_obj = random_maps(2, 4, 37, seed=5)
    base_deep = random_maps(2, 4, 37, seed=6)
    obj = base_obj.transpose(2, 3)[:, ::2]  # strided heads, transposed rows and columns
    deep = base_deep.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # heads-major storage
    assert not obj.is_contiguous() and not deep.is_contiguous()
    assert_same_selection(backend, device, obj, deep, 12, 6, 6, 1.0, 1)
    assert_same_selection(backend, device, obj[..., ::1], deep, 30, 6, 6, 0.1, 1, "square")


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_ties_and_nan(backend, device):
    n = 30
    obj = torch.zeros(2, n)
    obj[0, ::3] = 0.5  # ties among every third token
    obj[1, 5:9] = float("nan")
    deep = torch.full((2, n), 0.25)
    deep[0, 10:20] = float("nan")
    deep[1, ::2] = -0.0
    for budget in (1, 7, 15, n):
        for alpha in (0.0, 0.5, 1.0):
            assert_same_selection(backend, device, obj, deep, budget, 5, 6, alpha)
            assert_same_selection(backend, device, obj, deep, budget, 5, 6, alpha, 0, "square")


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_exact_ties_in_maps(backend, device):
    # Columns of equal mass, exact in any summation order: ties must break to the lower index everywhere.
    attn = torch.zeros(2, 2, 17, 17)
    attn[..., 1:] = 1.0 / 16
    attn[:, :, :, 3] += 0.5
    attn[:, :, :, 9] += 0.5
    attn = attn / attn.sum(-1, keepdim=True)
    assert_same_selection(backend, device, attn, attn, 6, 4, 4, 1.0, 1)


@pytest.mark.parametrize("backend,device", backend_params("attention_scores"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_scores_bitwise(backend, device, dtype):
    for batch, heads, length, prefix in ((1, 1, 1, 0), (3, 2, 17, 1), (2, 16, 50, 1), (8, 2, 197, 1)):
        if (backend, device) == ("triton", "cpu") and length > 50:
            continue
        attn = random_maps(batch, heads, length, dtype=dtype, seed=length)
        # The reference itself (torch-cpu) against a float64 mean, not its own code.
        expected = (attn.double()[..., prefix:].mean(dim=(1, 2)).float() if (backend, device) == ("torch", "cpu")
                    else ref.attention_scores(attn, prefix))
        got = hiprune_ops.attention_scores(attn.to(device), prefix, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (batch, length - prefix)
        assert torch.equal(got.cpu(), expected)
    strided = random_maps(2, 3, 20, seed=9).transpose(2, 3)[:, 1:]
    assert torch.equal(hiprune_ops.attention_scores(strided.to(device), 1, backend=backend).cpu(),
                       ref.attention_scores(strided, 1))


@pytest.mark.parametrize("backend,device", backend_params("prune"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_gathers_the_selected_features(backend, device, dtype):
    obj, deep = random_maps(3, 2, 26, seed=3), random_maps(3, 2, 26, seed=4)
    features = torch.randn(3, 25, 8).to(dtype)
    kept, idx = hiprune_ops.prune(features.to(device), obj.to(device), deep.to(device), 9, 5, 5, 0.5, 1,
                                  backend=backend)
    expected_idx = ref.select(obj, deep, 9, 5, 5, 0.5, 1)
    assert torch.equal(idx.cpu(), expected_idx)
    assert kept.dtype == dtype and kept.shape == (3, 9, 8)
    assert torch.equal(kept.cpu(), torch.stack([features[b, expected_idx[b]] for b in range(3)]))


@pytest.mark.parametrize("backend,device", backend_params("prune"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_gradient_on_every_backend(backend, device, dtype):
    """prune is differentiable in features, with the same backward whichever backend ran: a scatter of the kept
    rows' gradient, zero elsewhere; the maps get none."""
    obj, deep = random_maps(3, 2, 26, seed=5).to(device), random_maps(3, 2, 26, seed=6).to(device)
    obj.requires_grad_(True)
    features = torch.randn(3, 25, 4).to(device, dtype).requires_grad_(True)
    weights = torch.randn(3, 9, 4).to(device, dtype)
    kept, idx = hiprune_ops.prune(features, obj, deep, 9, 5, 5, 0.5, 1, backend=backend)
    (kept * weights).sum().backward()
    expected = torch.zeros(3, 25, 4, dtype=dtype)
    for b in range(3):
        expected[b, idx[b].cpu()] = weights[b].cpu()
    assert features.grad.dtype == dtype and torch.equal(features.grad.cpu(), expected)
    assert obj.grad is None or not bool(obj.grad.any())


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_invariants_hold_on_random_problems(backend, device):
    g = torch.Generator().manual_seed(0)
    max_side = 6 if (backend, device) == ("triton", "cpu") else 30
    for seed in range(12):
        grid_h, grid_w = (int(torch.randint(1, max_side + 1, (1,), generator=g)) for _ in range(2))
        n = grid_h * grid_w
        budget = int(torch.randint(1, n + 1, (1,), generator=g))
        alpha = float(torch.rand(1, generator=g))
        neighborhood = "square" if seed % 2 else "cross"
        obj, deep = random_scores(4, n, seed=seed), random_scores(4, n, seed=seed + 100)
        idx, roles = hiprune_ops.select_with_roles(obj.to(device), deep.to(device), budget, grid_h, grid_w, alpha,
                                                   neighborhood=neighborhood, backend=backend)
        assert_selection_invariants(obj, deep, idx, roles, budget, grid_h, grid_w, alpha, neighborhood)
