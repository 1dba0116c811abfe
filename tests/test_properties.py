"""Property tests (hypothesis) over random shapes, budgets, alphas, neighbourhoods, prefixes and dtypes, on every
backend present. Runs are derandomized: the same examples every run, so CI is reproducible."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hiprune_ops
from conftest import assert_selection_invariants, backend_params, random_maps
from hiprune_ops import reference as ref
from test_qk_scores import truth as qk_truth

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = ("triton", "cpu")  # the Triton interpreter: few, small examples


def property_settings(backend, device, examples):
    return settings(max_examples=8 if (backend, device) == INTERPRETED else examples, deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def selection_problems(draw, max_side):
    grid_h, grid_w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    n = grid_h * grid_w
    neighborhood, official = draw(st.sampled_from([("cross", False), ("square", False), ("cross", True)]))
    maps = draw(st.booleans())
    return dict(
        batch=draw(st.integers(0, 3)), grid_h=grid_h, grid_w=grid_w, budget=draw(st.integers(1, n)),
        alpha=draw(st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0))),
        neighborhood=neighborhood, official=official, maps=maps,
        num_prefix=draw(st.integers(0, 2)) if maps else 0, dtype=draw(st.sampled_from(DTYPES)),
        # ties: scores on a few levels (many equal values); nan: a few NaN scores (they rank last)
        ties=draw(st.booleans()), nan=draw(st.booleans()) and not maps, seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(p):
    n = p["grid_h"] * p["grid_w"]
    g = torch.Generator().manual_seed(p["seed"])
    if p["maps"]:
        heads = int(torch.randint(1, 3, (1,), generator=g))
        return [random_maps(p["batch"], heads, n + p["num_prefix"], dtype=p["dtype"], seed=p["seed"] + i,
                            temperature=0.1 if p["ties"] else 1.0) for i in range(2)]
    inputs = []
    for _ in range(2):
        scores = torch.rand(p["batch"], n, generator=g)
        if p["ties"]:
            scores = (scores * 4).floor() / 4
        if p["nan"]:
            scores[torch.rand(p["batch"], n, generator=g) < 0.1] = float("nan")
        inputs.append(scores.to(p["dtype"]))
    return inputs


def problem_scores(t, num_prefix):
    """The float32 scores the op ranks, NaN mapped below every number (our inputs hold no -inf)."""
    scores = ref.attention_scores(t, num_prefix) if t.dim() == 4 else t.float()
    return torch.nan_to_num(scores, nan=float("-inf"))


@pytest.mark.parametrize("backend,device", backend_params("prune"))
def test_selection_properties(backend, device):
    @property_settings(backend, device, 150)
    @given(p=selection_problems(max_side=5 if (backend, device) == INTERPRETED else 16))
    def check(p):
        obj, deep = make_inputs(p)
        args = (p["budget"], p["grid_h"], p["grid_w"], p["alpha"], p["num_prefix"], p["neighborhood"], p["official"])
        try:
            expected_idx, expected_roles = ref.select_with_roles(obj, deep, *args)
        except ValueError as error:  # official=True with more anchors and buffers than the budget
            assert "more than budget" in str(error)
            with pytest.raises(ValueError, match="more than budget"):
                hiprune_ops.select_with_roles(obj.to(device), deep.to(device), *args, backend=backend)
            return
        idx, roles = hiprune_ops.select_with_roles(obj.to(device), deep.to(device), *args, backend=backend)
        idx, roles = idx.cpu(), roles.cpu()
        n = p["grid_h"] * p["grid_w"]
        # Sorted, unique, in range, of exact size.
        assert idx.shape == roles.shape == (p["batch"], p["budget"]) and idx.dtype == torch.int64
        assert bool((idx[:, 1:] > idx[:, :-1]).all()) and bool((idx >= 0).all()) and bool((idx < n).all())
        if not p["official"]:  # anchors' on-grid neighbours kept; registers the best deep scores of the rest
            assert_selection_invariants(problem_scores(obj, p["num_prefix"]), problem_scores(deep, p["num_prefix"]),
                                        idx, roles, p["budget"], p["grid_h"], p["grid_w"], p["alpha"],
                                        p["neighborhood"])
        # Bit-identical to the reference, for select and prune too.
        assert torch.equal(idx, expected_idx) and torch.equal(roles, expected_roles)
        assert torch.equal(hiprune_ops.select(obj.to(device), deep.to(device), *args, backend=backend).cpu(), idx)
        features = torch.randn(p["batch"], n, 3)
        kept, pruned_idx = hiprune_ops.prune(features.to(device), obj.to(device), deep.to(device), *args,
                                             backend=backend)
        assert torch.equal(pruned_idx.cpu(), idx)
        assert torch.equal(kept.cpu(), torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, 3)))

    check()


@pytest.mark.parametrize("backend,device", backend_params("attention_scores"))
def test_attention_scores_properties(backend, device):
    @property_settings(backend, device, 60)
    @given(batch=st.integers(0, 3), heads=st.integers(1, 3), length=st.integers(1, 40),
           dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(batch, heads, length, dtype, seed, data):
        num_prefix = data.draw(st.integers(0, length - 1))
        attn = random_maps(batch, heads, length, dtype=dtype, seed=seed)
        out = hiprune_ops.attention_scores(attn.to(device), num_prefix, backend=backend)
        assert torch.equal(out.cpu(), ref.attention_scores(attn, num_prefix))

    check()


def row_lse(q, k, scale, cu_seqlens):
    """float32 log-sum-exp of each query row's scaled logits: (B, H, L), or (H, T) within segments when packed."""
    if cu_seqlens is None:
        return torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1).float()
    lse = torch.empty(q.shape[1], q.shape[0])
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            logits = q[s:e].double().transpose(0, 1) @ k[s:e].double().permute(1, 2, 0) * scale
            lse[:, s:e] = torch.logsumexp(logits, dim=-1).float()
    return lse


@pytest.mark.parametrize("backend,device", backend_params("qk_scores"))
def test_qk_scores_properties(backend, device):
    @property_settings(backend, device, 60)
    @given(batch=st.integers(0, 2), heads=st.integers(1, 3), length=st.integers(1, 40),
           dim=st.sampled_from([1, 8, 16, 33, 64, 80]), scale=st.floats(-1.0, 1.0), spread=st.floats(0.0, 4.0),
           dtype=st.sampled_from(DTYPES), packed=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(batch, heads, length, dim, scale, spread, dtype, packed, seed, data):
        g = torch.Generator().manual_seed(seed)
        if packed:
            cuts = sorted(data.draw(st.lists(st.integers(0, length), max_size=4)))
            cu_seqlens = torch.tensor([0, *cuts, length], dtype=torch.int32)
            shape, num_prefix = (length, heads, dim), 0
        else:
            cu_seqlens = None
            shape, num_prefix = (batch, heads, length, dim), data.draw(st.integers(0, length - 1))
        q = (torch.randn(shape, generator=g) * spread).to(dtype)
        k = (torch.randn(shape, generator=g) * spread).to(dtype)
        cu = None if cu_seqlens is None else cu_seqlens.to(device)
        expected = qk_truth(q, k, scale, num_prefix, cu_seqlens)
        # Without lse (two passes), and with the lse an attention forward would hand over (one pass).
        for lse in (None, row_lse(q, k, scale, cu_seqlens) if data.draw(st.booleans()) else None):
            out = hiprune_ops.qk_scores(q.to(device), k.to(device), scale, num_prefix, cu,
                                        None if lse is None else lse.to(device), backend=backend)
            assert out.dtype == torch.float32 and out.shape == expected.shape
            # float32 accumulation against the float64 dense softmax of the same (rounded) inputs.
            torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-5, atol=1e-9)

    check()
