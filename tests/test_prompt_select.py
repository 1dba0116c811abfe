"""prompt_select (HiPrune++) on every backend present, against an independent oracle written from docs/ops.md:
exact cosines (math.fsum), rounded once to float32, ranked by Python's sort. Ties, NaN, zero vectors, signed
zeros, extra up to every token left, B > 1, bad input, opcheck, torch.compile and property tests."""

import math

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hiprune_ops
from conftest import backend_params, random_scores
from hiprune_ops import reference as ref
from hiprune_ops.backend import has_cpp_kernel, triton_usable

PROMPT = 3
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = ("triton", "cpu")


def oracle(features, prompt, indices, roles, extra):
    """The contract restated per image and token, in Python floats: (indices, roles) as lists of rows."""
    out_indices, out_roles = [], []
    for b in range(features.shape[0]):
        kept = dict(zip(indices[b].tolist(), roles[b].tolist()))
        p = prompt[b].float().tolist()
        pp = math.fsum(y * y for y in p)
        ranked = []
        for i in range(features.shape[1]):
            if i in kept:
                continue
            f = features[b, i].float().tolist()
            dot, ff = math.fsum(x * y for x, y in zip(f, p)), math.fsum(x * x for x in f)
            denominator = math.sqrt(ff * pp)
            cosine = float(np.float32(dot / denominator)) if denominator > 0 else math.nan
            if math.isnan(dot):
                cosine = math.nan
            # NaN last; higher first (-0.0 == 0.0 for Python's comparisons); then the lower index.
            ranked.append((math.isnan(cosine), 0.0 if math.isnan(cosine) else -cosine, i))
        added = {i for _, _, i in sorted(ranked)[:extra]}
        chosen = sorted(set(kept) | added)
        out_indices.append(chosen)
        out_roles.append([kept.get(i, PROMPT) for i in chosen])
    return out_indices, out_roles


def hiprune_selection(batch, n, kept, seed):
    """Kept indices and roles as select_with_roles returns them, on a 1 x n grid."""
    obj, deep = random_scores(batch, n, seed=seed), random_scores(batch, n, seed=seed + 1)
    return hiprune_ops.select_with_roles(obj, deep, kept, 1, n, 0.5, backend="torch")


def assert_matches_oracle(backend, device, features, prompt, indices, roles, extra):
    got_indices, got_roles = hiprune_ops.ops._implementation("prompt_select", backend, torch.device(device))(
        features.to(device), prompt.to(device), indices.to(device), roles.to(device), extra)
    want_indices, want_roles = oracle(features, prompt, indices, roles, extra)
    assert got_indices.dtype == torch.int64 and got_roles.dtype == torch.int8
    assert got_indices.device.type == device
    assert got_indices.shape == got_roles.shape == (features.shape[0], indices.shape[1] + extra)
    assert got_indices.cpu().tolist() == want_indices, extra
    assert got_roles.cpu().tolist() == want_roles, extra
    return got_indices, got_roles


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_oracle(backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    for batch, n, channels, kept in ((1, 1, 3, 0), (1, 1, 3, 1), (3, 20, 7, 6), (2, 35, 40, 12), (4, 9, 1, 3)):
        features = torch.randn(batch, n, channels, generator=g).to(dtype)
        prompt = torch.randn(batch, channels, generator=g).to(dtype)
        indices, roles = hiprune_selection(batch, n, kept, seed=n) if kept else (
            torch.zeros(batch, 0, dtype=torch.int64), torch.zeros(batch, 0, dtype=torch.int8))
        for extra in sorted({0, 1, (n - kept) // 2, n - kept}):
            if extra <= n - kept:
                assert_matches_oracle(backend, device, features, prompt, indices, roles, extra)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_mixed_dtypes_and_strides(backend, device):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 24, 9, generator=g).transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, C) view
    channel_strided = torch.randn(2, 9, 24, generator=g).transpose(1, 2)  # channels not adjacent
    prompt = torch.randn(9, 2, generator=g, dtype=torch.float32).T.bfloat16()
    indices, roles = hiprune_selection(2, 24, 8, seed=3)
    for f in (features, channel_strided, features.half()):
        assert not f.is_contiguous() or f.dtype == torch.float16
        assert_matches_oracle(backend, device, f, prompt, indices, roles, 5)
    assert_matches_oracle(backend, device, features, prompt, indices[:, ::2], roles[:, ::2], 7)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_ties_nan_zero_vectors_and_signed_zeros(backend, device):
    channels = 4
    prompt = torch.tensor([[1.0, -2.0, 0.5, 0.0]] * 3)
    base = torch.tensor([1.0, -2.0, 0.5, 0.125])  # cosine 0.9985: above every random row's
    features = torch.randn(3, 16, channels, generator=torch.Generator().manual_seed(2))
    # Image 0: exact ties (equal rows, and rows scaled by powers of two: the same cosine bit for bit).
    for i, scale in zip((2, 5, 9, 12), (1.0, 2.0, 0.5, 4.0)):
        features[0, i] = base * scale
    features[0, 14] = -base  # the opposite: cosine negated, ranked low
    # Image 1: zero rows and NaN rows (NaN cosines: below every number), and orthogonal rows with signed zeros.
    features[1, 3] = 0.0
    features[1, 7] = -0.0
    features[1, 8] = float("nan")
    features[1, 10, 1] = float("nan")
    features[1, 4] = torch.tensor([-0.0, 0.0, 0.0, 1.0])  # orthogonal to the prompt: cosine 0
    features[1, 11] = torch.tensor([0.0, -0.0, -0.0, -1.0])
    # Image 2: a zero prompt: every cosine is NaN, so the added tokens are the lowest indices not kept.
    prompt[2] = 0.0
    indices = torch.tensor([[0, 5, 6, 14], [1, 2, 4, 15], [3, 4, 9, 10]])
    roles = torch.tensor([[0, 1, 2, 1], [2, 2, 1, 0], [1, 0, 1, 2]], dtype=torch.int8)
    for extra in (1, 2, 3, 5, 8, 12):
        got, got_roles = assert_matches_oracle(backend, device, features, prompt, indices, roles, extra)
    added = got[2][got_roles[2] == PROMPT].tolist()
    assert added == [0, 1, 2, 5, 6, 7, 8, 11, 12, 13, 14, 15]  # zero prompt: NaN everywhere, index order
    # Exact ties go to the lower index: of the tied tokens 2, 9, 12 (5 is kept), extra 1 takes 2.
    first = assert_matches_oracle(backend, device, features, prompt, indices, roles, 1)[0]
    assert first[0].tolist() == [0, 2, 5, 6, 14]


def test_oracle_ranks_the_tie_case_by_hand():
    """The oracle itself on a worked case: prompt (1, 0); cosines 1, 0.6, NaN (zero), -1, 0.6, 0."""
    features = torch.tensor([[[2.0, 0.0], [3.0, 4.0], [0.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [0.0, 5.0]]])
    prompt = torch.tensor([[1.0, 0.0]])
    indices, roles = torch.tensor([[0]]), torch.tensor([[1]], dtype=torch.int8)
    assert oracle(features, prompt, indices, roles, 2) == ([[0, 1, 4]], [[1, PROMPT, PROMPT]])
    assert oracle(features, prompt, indices, roles, 4) == ([[0, 1, 3, 4, 5]], [[1, 3, 3, 3, 3]])
    assert oracle(features, prompt, indices, roles, 5) == ([[0, 1, 2, 3, 4, 5]], [[1, 3, 3, 3, 3, 3]])


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_every_token_kept_or_added(backend, device):
    """kept + extra = N: every token comes back, kept ones with their roles (kept = N: nothing to add)."""
    features, prompt = torch.randn(2, 12, 5), torch.randn(2, 5)
    indices, roles = hiprune_selection(2, 12, 4, seed=5)
    got, got_roles = assert_matches_oracle(backend, device, features, prompt, indices, roles, 8)
    assert torch.equal(got.cpu(), torch.arange(12).expand(2, 12))
    assert int((got_roles == PROMPT).sum()) == 16
    everything = torch.arange(12).expand(2, 12).contiguous()
    all_roles = torch.full((2, 12), 2, dtype=torch.int8)
    assert_matches_oracle(backend, device, features, prompt, everything, all_roles, 0)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_no_prompt_text_adds_nothing(backend, device):
    """beta = 0, or a prompt without text (prompt=None): the op returns select's tokens and roles unchanged."""
    features = torch.randn(3, 20, 6).to(device)
    indices, roles = (t.to(device) for t in hiprune_selection(3, 20, 7, seed=6))
    for prompt, beta in ((None, 0.1), (torch.randn(3, 6).to(device), 0.0)):
        got, got_roles = hiprune_ops.prompt_select(features, prompt, indices, roles, beta, backend=backend)
        assert torch.equal(got, indices) and torch.equal(got_roles, roles)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_empty_batch(backend, device):
    for kept, extra in ((3, 2), (0, 0)):
        got, got_roles = hiprune_ops.ops._implementation("prompt_select", backend, torch.device(device))(
            torch.randn(0, 9, 4).to(device), torch.randn(0, 4).to(device),
            torch.zeros(0, kept, dtype=torch.int64).to(device), torch.zeros(0, kept, dtype=torch.int8).to(device),
            extra)
        assert got.shape == got_roles.shape == (0, kept + extra) and got.dtype == torch.int64


# --- the count rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kept,n,beta,expected", [
    (192, 576, 0.1, 19),   # 19.2
    (64, 576, 0.1, 6),     # 6.4
    (128, 576, 0.1, 13),   # 12.8
    (25, 576, 0.1, 2),     # 2.5 rounds to even 2
    (35, 576, 0.1, 4),     # 3.5 rounds to even 4
    (12, 16, 1.0, 4),      # 12 asked, 4 left
    (16, 16, 0.5, 0),      # nothing left
    (0, 16, 1.0, 0),
    (192, 576, 0.0, 0),    # beta 0: HiPrune exactly
])
def test_extra_count(kept, n, beta, expected):
    assert hiprune_ops.prompt_extra_count(kept, n, beta) == expected
    assert hiprune_ops.prompt_extra_count(kept, n, beta, has_text=False) == 0


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_extra_count_rejects_beta(beta):
    with pytest.raises(ValueError, match="beta must be in"):
        hiprune_ops.prompt_extra_count(10, 20, beta)
    with pytest.raises(ValueError, match="beta must be in"):
        hiprune_ops.prompt_select(torch.randn(1, 20, 2), torch.randn(1, 2), torch.arange(10)[None],
                                  torch.zeros(1, 10, dtype=torch.int8), beta)


def test_extra_count_rejects_kept():
    with pytest.raises(ValueError, match="kept must be in"):
        hiprune_ops.prompt_extra_count(21, 20, 0.1)


def test_wrapper_uses_the_count_rule():
    features, prompt = torch.randn(2, 30, 4), torch.randn(2, 4)
    indices, roles = hiprune_selection(2, 30, 25, seed=7)
    got, _ = hiprune_ops.prompt_select(features, prompt, indices, roles, 0.1)  # 2.5 rounds to 2
    assert got.shape == (2, 27)
    got, _ = hiprune_ops.prompt_select(features, prompt, indices, roles, 1.0)  # 25 asked, 5 left
    assert got.shape == (2, 30)


# --- bad input -----------------------------------------------------------------------------------------------------

F, P = torch.randn(2, 10, 4), torch.randn(2, 4)
I, R = torch.tensor([[1, 4, 7], [0, 2, 9]]), torch.zeros(2, 3, dtype=torch.int8)
BAD = [
    # (description, features, prompt, indices, roles, extra, error, pattern)
    ("2-D features", F[0], P, I, R, 1, ValueError, "features must be \\(B, N, C\\)"),
    ("integer features", F.int(), P, I, R, 1, TypeError, "features must be float32"),
    ("3-D prompt", F, P[None], I, R, 1, ValueError, "prompt must be \\(B, C\\)"),
    ("float64 prompt", F, P.double(), I, R, 1, TypeError, "prompt must be float32"),
    ("1-D indices", F, P, I[0], R, 1, ValueError, "indices must be \\(B, kept\\)"),
    ("int32 indices", F, P, I.int(), R, 1, TypeError, "indices must be int64"),
    ("int64 roles", F, P, I, R.long(), 1, TypeError, "roles must be int8"),
    ("prompt batch", F, P[:1], I, R, 1, ValueError, "prompt batch 1 does not match features batch 2"),
    ("prompt channels", F, P[:, :3], I, R, 1, ValueError, "prompt has 3 channels but features has 4"),
    ("indices batch", F, P, I[:1], R[:1], 1, ValueError, "indices batch 1 does not match features batch 2"),
    ("roles shape", F, P, I, R[:, :2], 1, ValueError, "roles shape \\(2, 2\\) must equal indices shape \\(2, 3\\)"),
    ("too many kept", F[:, :2], P, I, R, 0, ValueError, "indices has 3 kept tokens but features has only N = 2"),
    ("negative extra", F, P, I, R, -1, ValueError, "extra must be in \\[0, N - kept\\] = \\[0, 7\\], got -1"),
    ("extra above what is left", F, P, I, R, 8, ValueError, "extra must be in \\[0, N - kept\\] = \\[0, 7\\]"),
]
VALUE_BAD = [  # values, checked on the CPU only (a GPU would synchronise)
    ("decreasing", torch.tensor([[1, 4, 7], [0, 9, 2]]), "row 1 has 2 after 9"),
    ("repeated", torch.tensor([[1, 4, 4], [0, 2, 9]]), "row 0 has 4 after 4"),
    ("out of range", torch.tensor([[1, 4, 10], [0, 2, 9]]), "row 0 has 10 after 4"),
    ("negative", torch.tensor([[-1, 4, 7], [0, 2, 9]]), "row 0 has -1 after -1"),
]


def call_op(backend, device, features, prompt, indices, roles, extra):
    return hiprune_ops.ops._implementation("prompt_select", backend, torch.device(device))(
        features.to(device), prompt.to(device), indices.to(device), roles.to(device), extra)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_rejects(backend, device, case):
    _, features, prompt, indices, roles, extra, error, pattern = case
    with pytest.raises(error, match=pattern):
        call_op(backend, device, features, prompt, indices, roles, extra)


@pytest.mark.parametrize("backend,device", [p for p in backend_params("prompt_select") if p.values[1] == "cpu"])
@pytest.mark.parametrize("case", VALUE_BAD, ids=[c[0] for c in VALUE_BAD])
def test_rejects_index_values_on_cpu(backend, device, case):
    _, indices, pattern = case
    with pytest.raises(ValueError, match="indices must be strictly increasing in \\[0, N - 1\\] = \\[0, 9\\], "
                       + pattern):
        call_op(backend, device, F, P, indices, R, 2)


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_rejects_mixed_devices(backend, device):
    other = "cuda" if device == "cpu" and torch.cuda.is_available() else ("cpu" if device == "cuda" else "meta")
    for position, name in ((1, "prompt"), (2, "indices"), (3, "roles")):
        args = [F.to(device), P.to(device), I.to(device), R.to(device), 2]
        args[position] = args[position].to(other)
        with pytest.raises(ValueError, match=f"{name} is on {other}"):
            hiprune_ops.ops._implementation("prompt_select", backend, torch.device(device))(*args)


# --- the dispatcher: opcheck, fake, torch.compile ------------------------------------------------------------------

requires_cpp_cpu = pytest.mark.skipif(not has_cpp_kernel("prompt_select", "cpu"),
                                      reason="hiprune::prompt_select has no CPU kernel in this build")


def opcheck_samples(device="cpu"):
    g = torch.Generator().manual_seed(8)
    features = torch.randn(3, 20, 6, generator=g)
    indices, roles = hiprune_selection(3, 20, 7, seed=8)
    samples = [(features, torch.randn(3, 6, generator=g), indices, roles, 4),
               (features.bfloat16().transpose(0, 1).contiguous().transpose(0, 1), torch.randn(3, 6).half(), indices,
                roles, 13),
               (features, torch.randn(3, 6, generator=g), indices, roles, 0)]
    return [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in s) for s in samples]


@requires_cpp_cpu
def test_opcheck():
    for args in opcheck_samples():
        torch.library.opcheck(torch.ops.hiprune.prompt_select, args)


def test_fake_gives_the_shape_from_the_arguments():
    features = torch.empty(4, 50, 8, device="meta")
    got, got_roles = hiprune_ops.ops.prompt_select_fake(features, torch.empty(4, 8, device="meta"),
                                                         torch.empty(4, 12, dtype=torch.int64, device="meta"),
                                                         torch.empty(4, 12, dtype=torch.int8, device="meta"), 5)
    assert got.shape == got_roles.shape == (4, 17) and got.dtype == torch.int64 and got_roles.dtype == torch.int8


def _hiprune_plus_plus(obj, deep, features, prompt):
    indices, roles = hiprune_ops.select_with_roles(obj, deep, 6, 4, 4, 0.5)
    return hiprune_ops.prompt_select(features, prompt, indices, roles, 0.5)


@requires_cpp_cpu
def test_compile_fullgraph_dynamic():
    """Inductor, fullgraph, dynamic shapes: a second batch size and channel count reuse the one graph."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(_hiprune_plus_plus, backend=counter, fullgraph=True, dynamic=True)
    for batch, channels in ((3, 5), (6, 9)):
        g = torch.Generator().manual_seed(batch)
        obj, deep = torch.rand(batch, 16, generator=g), torch.rand(batch, 16, generator=g)
        features, prompt = torch.randn(batch, 16, channels, generator=g), torch.randn(batch, channels, generator=g)
        for got, want in zip(compiled(obj, deep, features, prompt), _hiprune_plus_plus(obj, deep, features, prompt)):
            assert torch.equal(got, want)
            assert got.shape[1] == 9  # 6 kept, round(0.5 * 6) = 3 added
    assert counter.frame_count == 1


@requires_cpp_cpu
def test_compile_fullgraph_op_with_dynamic_kept_count():
    """The op's output size kept + extra from a symbolic kept count."""
    def pipeline(features, prompt, indices, roles):
        return torch.ops.hiprune.prompt_select(features, prompt, indices, roles, 2)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(pipeline, backend=counter, fullgraph=True, dynamic=True)
    for kept in (5, 7):
        features, prompt = torch.randn(2, 20, 4), torch.randn(2, 4)
        indices, roles = hiprune_selection(2, 20, kept, seed=kept)
        for got, want in zip(compiled(features, prompt, indices, roles), pipeline(features, prompt, indices, roles)):
            assert torch.equal(got, want) and got.shape == (2, kept + 2)
    assert counter.frame_count == 1


@pytest.mark.skipif(not triton_usable("cuda" if torch.cuda.is_available() else "cpu"), reason="Triton cannot run")
def test_dynamo_captures_the_triton_op():
    # Under the interpreter AOT autograd cannot trace the kernels: this checks Dynamo's part (no graph break).
    import hiprune_ops.triton_kernels  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def pipeline(features, prompt, indices, roles):
        return torch.ops.hiprune_triton.prompt_select(features, prompt, indices, roles, 3)

    counter = torch._dynamo.testing.CompileCounterWithBackend("eager" if device == "cpu" else "inductor")
    compiled = torch.compile(pipeline, backend=counter, fullgraph=True, dynamic=True)
    features, prompt = torch.randn(2, 20, 4, device=device), torch.randn(2, 4, device=device)
    indices, roles = (t.to(device) for t in hiprune_selection(2, 20, 6, seed=9))
    for got, want in zip(compiled(features, prompt, indices, roles), pipeline(features, prompt, indices, roles)):
        assert torch.equal(got, want)
    assert counter.frame_count == 1


@pytest.mark.skipif(not triton_usable("cuda" if torch.cuda.is_available() else "cpu"), reason="Triton cannot run")
def test_triton_streaming_path(monkeypatch):
    """N beyond the in-register size: the radix select streams the keys in chunks."""
    from hiprune_ops.triton_kernels import _selection

    monkeypatch.setattr(_selection, "SORT_MAX_N", 8)
    monkeypatch.setattr(_selection, "PAIRWISE_MAX_N", 0)
    monkeypatch.setattr(_selection, "RADIX_CHUNK", 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = torch.randn(2, 42, 5, generator=torch.Generator().manual_seed(10))
    features[0, 20:30] = features[0, 19]  # ties straddling the cut
    prompt = torch.randn(2, 5, generator=torch.Generator().manual_seed(11))
    indices, roles = hiprune_selection(2, 42, 10, seed=12)
    for extra in (1, 9, 32):
        assert_matches_oracle("triton", device, features, prompt, indices, roles, extra)


# --- properties ------------------------------------------------------------------------------------------------

@st.composite
def prompt_problems(draw, max_n):
    n = draw(st.integers(1, max_n))
    kept = draw(st.integers(0, n))
    return dict(batch=draw(st.integers(0, 3)), n=n, channels=draw(st.integers(1, 12)), kept=kept,
                extra=draw(st.integers(0, n - kept)), dtype=draw(st.sampled_from(DTYPES)),
                prompt_dtype=draw(st.sampled_from(DTYPES)), ties=draw(st.booleans()), nan=draw(st.booleans()),
                zeros=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def make_problem(p):
    g = torch.Generator().manual_seed(p["seed"])
    batch, n, channels = p["batch"], p["n"], p["channels"]
    features = torch.randn(batch, n, channels, generator=g)
    if p["ties"]:  # few levels: many equal rows and many equal cosines
        features = features.sign() * (features.abs() > 0.7)
    if p["zeros"]:
        features[torch.rand(batch, n, generator=g) < 0.2] = 0.0
    if p["nan"]:
        features[torch.rand(batch, n, channels, generator=g) < 0.05] = float("nan")
    prompt = torch.randn(batch, channels, generator=g)
    indices = torch.stack([torch.sort(torch.randperm(n, generator=g)[:p["kept"]]).values for _ in range(batch)]) \
        if batch else torch.zeros(0, p["kept"], dtype=torch.int64)
    roles = torch.randint(0, 3, (batch, p["kept"]), generator=g, dtype=torch.int8)
    return features.to(p["dtype"]), prompt.to(p["prompt_dtype"]), indices.reshape(batch, p["kept"]), roles


@pytest.mark.parametrize("backend,device", backend_params("prompt_select"))
def test_properties(backend, device):
    @settings(max_examples=10 if (backend, device) == INTERPRETED else 150, deadline=None, derandomize=True,
              database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(p=prompt_problems(max_n=12 if (backend, device) == INTERPRETED else 40))
    def check(p):
        features, prompt, indices, roles = make_problem(p)
        got, got_roles = assert_matches_oracle(backend, device, features, prompt, indices, roles, p["extra"])
        got, got_roles = got.cpu(), got_roles.cpu()
        # Strictly increasing, a superset of the kept tokens whose roles are kept, exactly extra added.
        assert bool((got[:, 1:] > got[:, :-1]).all())
        assert int((got_roles == PROMPT).sum()) == p["batch"] * p["extra"]
        for b in range(p["batch"]):
            assert set(indices[b].tolist()) <= set(got[b].tolist())

    check()


def test_cosines_do_not_depend_on_the_summation_order():
    """docs/ops.md's measurement: the backends sum in different orders, and at LLaVA's width (C = 4096) reversing
    the channels of 24 x 576 random tokens changes none of their float32 cosines."""
    changed = 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        features, prompt = torch.randn(4, 576, 4096, generator=g), torch.randn(4, 4096, generator=g)
        forward = ref.prompt_cosines(features, prompt)
        changed += int((forward != ref.prompt_cosines(features.flip(-1), prompt.flip(-1))).sum())
    assert changed == 0


def test_reference_is_the_wrappers_torch_backend():
    """backend='torch' is hiprune_ops.reference.prompt_select (which the oracle above checks)."""
    features, prompt = torch.randn(2, 10, 3), torch.randn(2, 3)
    indices, roles = hiprune_selection(2, 10, 4, seed=13)
    for got, want in zip(hiprune_ops.prompt_select(features, prompt, indices, roles, 0.5, backend="torch"),
                         ref.prompt_select(features, prompt, indices, roles, 2)):
        assert torch.equal(got, want)


# --- CUDA only ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
class TestCuda:
    def _skip_missing(self, backend):
        if backend == "cpp" and not has_cpp_kernel("prompt_select", "cuda"):
            pytest.skip("hiprune::prompt_select has no CUDA kernel in this build")
        if backend == "triton":
            import hiprune_ops.triton_kernels  # noqa: F401  (registers torch.ops.hiprune_triton)

    @pytest.mark.parametrize("n,channels,kept,dtype", [(576, 4096, 192, torch.float16), (576, 4096, 64, torch.float32),
                                                       (1024, 3584, 342, torch.bfloat16), (9216, 64, 3000,
                                                                                           torch.float32)])
    def test_model_shapes_match_the_reference(self, backend, n, channels, kept, dtype):
        self._skip_missing(backend)
        g = torch.Generator().manual_seed(n)
        features = torch.randn(4, n, channels, generator=g).to(dtype)
        prompt = torch.randn(4, channels, generator=g).to(dtype)
        features[1, 100:140] = features[1, 99]  # exact ties
        indices, roles = hiprune_ops.select_with_roles(torch.rand(4, n, generator=g), torch.rand(4, n, generator=g),
                                                       kept, 1, n, 0.1, backend="torch")
        extra = hiprune_ops.prompt_extra_count(kept, n, 0.1)
        want = ref.prompt_select(features, prompt, indices, roles, extra)
        got = hiprune_ops.ops._implementation("prompt_select", backend, torch.device("cuda"))(
            features.cuda(), prompt.cuda(), indices.cuda(), roles.cuda(), extra)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        left = n - kept  # every token left
        got = hiprune_ops.ops._implementation("prompt_select", backend, torch.device("cuda"))(
            features.cuda(), prompt.cuda(), indices.cuda(), roles.cuda(), left)
        assert torch.equal(got[0].cpu(), ref.prompt_select(features, prompt, indices, roles, left)[0])

    def test_no_host_sync_and_graph_capture(self, backend):
        self._skip_missing(backend)
        features, prompt = torch.randn(2, 576, 256, device="cuda"), torch.randn(2, 256, device="cuda")
        indices, roles = (t.cuda() for t in hiprune_selection(2, 576, 192, seed=14))
        op = hiprune_ops.ops._implementation("prompt_select", backend, torch.device("cuda"))
        want = op(features, prompt, indices, roles, 19)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            op(features, prompt, indices, roles, 19)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            op(features, prompt, indices, roles, 19)  # warm up off the default stream
            with torch.cuda.graph(graph):
                got = op(features, prompt, indices, roles, 19)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    def test_opcheck(self, backend):
        self._skip_missing(backend)
        op = torch.ops.hiprune.prompt_select if backend == "cpp" else torch.ops.hiprune_triton.prompt_select
        for args in opcheck_samples("cuda"):
            torch.library.opcheck(op, args)
