"""The Triton backend (torch.ops.hiprune_triton.*) against the torch reference.

On a machine without a GPU these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), so
the shapes are small. TestTritonCuda repeats the key checks on a CUDA device and under torch.compile(fullgraph=True).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

import hiprune_ops
from hiprune_ops import reference
from hiprune_ops.backend import triton_usable

from conftest import random_maps, random_scores

triton_kernels = pytest.importorskip("hiprune_ops.triton_kernels")
from hiprune_ops.triton_kernels import _selection  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(DEVICE), reason="Triton cannot run here")
ops = torch.ops.hiprune_triton


def assert_same_selection(object_attn, deep_attn, *args, indices_only=False):
    want_indices, want_roles = reference.select_with_roles(object_attn.cpu(), deep_attn.cpu(), *args)
    if indices_only:
        indices = ops.select(object_attn, deep_attn, *args)
        torch.testing.assert_close(indices.cpu(), want_indices, rtol=0, atol=0)
        return indices, None
    indices, roles = ops.select_with_roles(object_attn, deep_attn, *args)
    torch.testing.assert_close(indices.cpu(), want_indices, rtol=0, atol=0)
    torch.testing.assert_close(roles.cpu(), want_roles, rtol=0, atol=0)
    return indices, roles


@pytest.fixture
def streaming_path(monkeypatch):
    """Forces the radix-select path (keys streamed in chunks) on small grids."""
    monkeypatch.setattr(_selection, "SORT_MAX_N", 8)
    monkeypatch.setattr(_selection, "PAIRWISE_MAX_N", 0)
    monkeypatch.setattr(_selection, "RADIX_CHUNK", 16)


# ---------------------------------------------------------------------------------------------- attention_scores

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_attention_scores_bit_exact(dtype, num_prefix):
    attn = random_maps(2, 3, 17, dtype=dtype, seed=3, device=DEVICE)
    torch.testing.assert_close(ops.attention_scores(attn, num_prefix).cpu(),
                               reference.attention_scores(attn.cpu(), num_prefix), rtol=0, atol=0)


def test_attention_scores_non_contiguous():
    attn = random_maps(2, 3, 10, seed=4, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1).mT
    assert not attn.is_contiguous()
    torch.testing.assert_close(ops.attention_scores(attn, 2).cpu(), reference.attention_scores(attn.cpu(), 2),
                               rtol=0, atol=0)


def test_attention_scores_single_token():
    attn = torch.ones(1, 2, 1, 1, device=DEVICE)
    torch.testing.assert_close(ops.attention_scores(attn).cpu(), torch.ones(1, 1))


# ------------------------------------------------------------------------------------------------------ selection

@pytest.mark.parametrize("grid, num_prefix", [((1, 1), 0), ((4, 4), 0), ((5, 7), 1), ((14, 14), 1)])
def test_select_maps_every_grid(grid, num_prefix):
    n = grid[0] * grid[1]
    object_attn = random_maps(2, 2, n + num_prefix, seed=1, device=DEVICE)
    deep_attn = random_maps(2, 2, n + num_prefix, seed=2, device=DEVICE)
    for budget, alpha in ((1, 0.1), (max(1, n // 3), 0.0), (max(1, n // 3), 1.0), (n, 0.1)):
        assert_same_selection(object_attn, deep_attn, budget, *grid, alpha, num_prefix)
    assert_same_selection(object_attn, deep_attn, max(1, n // 2), *grid, 0.5, num_prefix, indices_only=True)


@pytest.mark.parametrize("neighborhood", ["cross", "square"])
@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (14, 14)])
def test_select_scores_both_neighbourhoods(neighborhood, grid):
    n = grid[0] * grid[1]
    object_scores, deep_scores = random_scores(2, n, seed=5, device=DEVICE), random_scores(2, n, seed=6, device=DEVICE)
    for budget, alpha in ((9, 1.0), (n // 2, 0.1), (n // 2, 1.0), (n, 1.0)):
        indices, roles = assert_same_selection(object_scores, deep_scores, budget, *grid, alpha, 0, neighborhood)
        assert (indices.diff(dim=1) > 0).all()
    assert (roles == 0).any() and (roles == 1).any()  # alpha 1, budget n: anchors and buffers both occur


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (1, 6), (6, 1)])
def test_select_official(grid):
    n = grid[0] * grid[1]
    object_scores, deep_scores = random_scores(2, n, seed=7, device=DEVICE), random_scores(2, n, seed=8, device=DEVICE)
    # Anchors at the ends make the clamped steps pile onto tokens 0 and N-1.
    object_scores[0, 0] = object_scores[0, -1] = 2.0
    object_scores[1, min(1, n - 1)] = object_scores[1, max(n - 2, 0)] = 2.0
    for budget, alpha in ((5, 1.0), (n // 2, 0.5), (n, 1.0)):
        if not overflows(object_scores, deep_scores, budget, grid, alpha):
            assert_same_selection(object_scores, deep_scores, budget, *grid, alpha, 0, "cross", True)


def overflows(object_scores, deep_scores, budget, grid, alpha):
    try:
        reference.select(object_scores.cpu(), deep_scores.cpu(), budget, *grid, alpha, 0, "cross", True)
    except ValueError:
        return True
    return False


def test_select_official_overflow_error():
    object_scores = random_scores(2, 16, seed=9, device=DEVICE)
    deep_scores = random_scores(2, 16, seed=10, device=DEVICE)
    with pytest.raises(ValueError) as want:
        reference.select(object_scores.cpu(), deep_scores.cpu(), 8, 4, 4, 1.0, 0, "cross", True)
    with pytest.raises(ValueError) as got:
        ops.select(object_scores, deep_scores, 8, 4, 4, 1.0, 0, "cross", True)
    assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="official=True keeps"):
        ops.prune(torch.zeros(2, 16, 3, device=DEVICE), object_scores, deep_scores, 8, 4, 4, 1.0, 0, "cross", True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_half_precision(dtype):
    object_attn = random_maps(2, 2, 26, dtype=dtype, seed=11, device=DEVICE)
    deep_attn = random_maps(2, 2, 26, dtype=dtype, seed=12, device=DEVICE)
    assert_same_selection(object_attn, deep_attn, 10, 5, 5, 0.5, 1)
    assert_same_selection(object_attn[:, 0, 0, 1:], deep_attn[:, 0, 0, 1:], 10, 5, 5, 0.5)  # 2-D half scores


def test_select_non_contiguous_inputs():
    object_attn = random_maps(2, 2, 21, seed=13, device=DEVICE).mT
    deep_scores = random_scores(20, 2, seed=14, device=DEVICE).T
    assert not object_attn.is_contiguous() and not deep_scores.is_contiguous()
    assert_same_selection(object_attn, deep_scores, 8, 4, 5, 1.0, 1, "square")


def test_select_ties_nan_signed_zero():
    n = 35
    object_scores = torch.zeros(4, n)
    object_scores[1, ::3] = float("nan")
    object_scores[2] = torch.tensor([-0.0, 0.0] * 17 + [-0.0])
    object_scores[3, :5] = float("inf")
    object_scores[3, 5:10] = float("-inf")
    deep_scores = torch.full((4, n), 0.25)
    deep_scores[0, ::2] = float("nan")
    deep_scores[2, 20:] = float("nan")
    deep_scores[3, 4:8] = 1.0
    object_scores, deep_scores = object_scores.to(DEVICE), deep_scores.to(DEVICE)
    for budget, alpha, neighborhood in ((1, 0.0, "cross"), (7, 1.0, "square"), (20, 0.6, "cross"), (35, 1.0, "square")):
        assert_same_selection(object_scores, deep_scores, budget, 5, 7, alpha, 0, neighborhood)


@pytest.mark.parametrize("pairwise_max_n", [0, 64])
def test_select_radix_in_registers_and_pairwise(monkeypatch, pairwise_max_n):
    monkeypatch.setattr(_selection, "PAIRWISE_MAX_N", pairwise_max_n)
    object_scores = random_scores(2, 35, seed=41, device=DEVICE)
    deep_scores = random_scores(2, 35, seed=42, device=DEVICE)
    object_scores[1, 10:] = 0.5  # ties straddling the cut: the index part of the radix select runs
    deep_scores[0, ::3] = 0.25
    for budget, alpha, neighborhood in ((17, 1.0, "cross"), (30, 0.4, "square"), (1, 0.0, "cross")):
        assert_same_selection(object_scores, deep_scores, budget, 5, 7, alpha, 0, neighborhood)


def test_select_streaming_path(streaming_path):
    object_scores = random_scores(2, 42, seed=15, device=DEVICE)
    deep_scores = random_scores(2, 42, seed=16, device=DEVICE)
    object_scores[0, 20:] = 0.5  # ties straddling the cut: the index part of the radix select runs
    deep_scores[1, ::5] = float("nan")
    deep_scores[1, 1::5] = 0.25
    assert_same_selection(object_scores, deep_scores, 21, 6, 7, 1.0)
    assert_same_selection(object_scores, deep_scores, 30, 6, 7, 1.0, 0, "square")
    assert_same_selection(object_scores, deep_scores, 12, 6, 7, 1.0, 0, "cross", True)


def test_prune_gathers_features():
    features = torch.randn(2, 35, 6, generator=torch.Generator().manual_seed(18)).to(DEVICE, torch.float16)
    features = features.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    object_attn = random_maps(2, 2, 36, seed=19, device=DEVICE)
    deep_attn = random_maps(2, 2, 36, seed=20, device=DEVICE)
    kept, indices = ops.prune(features, object_attn, deep_attn, 12, 5, 7, 0.5, 1)
    want_kept, want_indices = reference.prune(features.cpu(), object_attn.cpu(), deep_attn.cpu(), 12, 5, 7, 0.5, 1)
    assert kept.dtype == torch.float16 and kept.shape == (2, 12, 6)
    torch.testing.assert_close(indices.cpu(), want_indices, rtol=0, atol=0)
    torch.testing.assert_close(kept.cpu(), want_kept, rtol=0, atol=0)


def test_public_wrapper_backend_triton():
    object_attn = random_maps(1, 2, 17, seed=21, device=DEVICE)
    deep_attn = random_maps(1, 2, 17, seed=22, device=DEVICE)
    got = hiprune_ops.select(object_attn, deep_attn, 6, 4, 4, 0.5, 1, backend="triton")
    torch.testing.assert_close(got.cpu(), reference.select(object_attn.cpu(), deep_attn.cpu(), 6, 4, 4, 0.5, 1))
    roles = hiprune_ops.select_with_roles(object_attn, deep_attn, 6, 4, 4, 0.5, 1, backend="triton")[1]
    assert roles.dtype == torch.int8


@pytest.mark.parametrize("call, error, match", [
    (lambda o, d: ops.select(o, d, 0, 4, 4), ValueError, "budget"),
    (lambda o, d: ops.select(o, d, 17, 4, 4), ValueError, "budget"),
    (lambda o, d: ops.select(o, d, 4, 3, 5), ValueError, "grid_h"),
    (lambda o, d: ops.select(o, d, 4, 4, 4, 1.5), ValueError, "alpha"),
    (lambda o, d: ops.select(o, d, 4, 4, 4, 0.1, 0, "diamond"), ValueError, "neighborhood"),
    (lambda o, d: ops.select(o, d, 4, 4, 4, 0.1, 0, "square", True), ValueError, "official"),
    (lambda o, d: ops.select(o.long(), d, 4, 4, 4), TypeError, "object_attn"),
    (lambda o, d: ops.select(o, d[:1], 4, 4, 4), ValueError, "deep_attn"),
    (lambda o, d: ops.select(o[0], d, 4, 4, 4), ValueError, "object_attn"),
    (lambda o, d: ops.select_with_roles(o, d[:, :15], 4, 4, 4), ValueError, "deep_attn"),
    (lambda o, d: ops.prune(torch.zeros(2, 15, 3), o, d, 4, 4, 4), ValueError, "features"),
    (lambda o, d: ops.attention_scores(torch.zeros(1, 1, 3, 4)), ValueError, "attn"),
    (lambda o, d: ops.attention_scores(torch.zeros(1, 1, 3, 3), 3), ValueError, "num_prefix"),
])
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(random_scores(2, 16, device=DEVICE), random_scores(2, 16, seed=1, device=DEVICE))


# ------------------------------------------------------------------------------------------------------ qk_scores

def _qk(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE, dtype) for _ in range(2)]


@pytest.mark.parametrize("batch, heads, length, dim, num_prefix", [
    (1, 1, 1, 64, 0), (2, 3, 19, 64, 1), (1, 2, 33, 80, 0), (2, 1, 17, 128, 3),
])
def test_qk_scores_dense(batch, heads, length, dim, num_prefix):
    q, k = _qk((batch, heads, length, dim), seed=length)
    got = ops.qk_scores(q, k, dim ** -0.5, num_prefix)
    want = reference.qk_scores(q.cpu(), k.cpu(), dim ** -0.5, num_prefix)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_scores_half_and_strided(dtype):
    q, k = _qk((2, 13, 3, 64), dtype, seed=23)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, D) views of (B, L, H, D)
    got = ops.qk_scores(q, k, 0.125, 1)
    torch.testing.assert_close(got.cpu(), reference.qk_scores(q.cpu(), k.cpu(), 0.125, 1), rtol=1e-3, atol=1e-5)


def test_qk_scores_varlen():
    q, k = _qk((40, 2, 64), seed=24)
    cu_seqlens = torch.tensor([0, 1, 18, 18, 21, 40], dtype=torch.int32, device=DEVICE)  # a 1-token and an empty one
    got = ops.qk_scores(q, k, 0.125, 0, cu_seqlens)
    want = reference.qk_scores(q.cpu(), k.cpu(), 0.125, 0, cu_seqlens.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    assert got[0].item() == pytest.approx(1.0)  # a 1-token segment attends only to itself


def _row_lse(q, k, scale):
    """Natural-log LSE of each query row, float32, from a dense float64 map: (B, H, L) for (B, H, L, D)."""
    return torch.logsumexp(q.cpu().double() @ k.cpu().double().mT * scale, dim=-1).float().to(q.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 80])
def test_qk_scores_with_lse(dtype, dim):
    q, k = _qk((2, 2, 37, dim), dtype, seed=26 + dim)
    scale = dim ** -0.5
    want = reference.qk_scores(q.cpu(), k.cpu(), scale, 1)
    got = ops.qk_scores(q, k, scale, 1, None, _row_lse(q, k, scale))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4 if dtype == torch.float32 else 1e-3, atol=1e-6)
    # The lse is read, not recomputed: lse + log(2) halves every score.
    halved = ops.qk_scores(q, k, scale, 1, None, _row_lse(q, k, scale) + math.log(2.0))
    torch.testing.assert_close(halved.cpu(), want / 2, rtol=1e-4 if dtype == torch.float32 else 1e-3, atol=1e-6)


@pytest.mark.parametrize("dim, chunks", [(64, (64, 0)), (72, (64, 16)), (80, (64, 16)), (96, (64, 32)),
                                         (128, (128, 0)), (8, (16, 0))])
def test_qk_scores_head_dims_split_into_two_dots(dim, chunks):
    # 80 runs as 64 + 16 channels, not padded to 128; every split gives the reference's scores.
    assert triton_kernels.qk_scores.channel_chunks(dim) == chunks
    q, k = _qk((1, 2, 20, dim), seed=dim)
    torch.testing.assert_close(ops.qk_scores(q, k, dim ** -0.5, 1).cpu(),
                               reference.qk_scores(q.cpu(), k.cpu(), dim ** -0.5, 1), rtol=1e-4, atol=1e-6)


def test_qk_scores_varlen_with_lse():
    q, k = _qk((45, 3, 80), seed=27)
    bounds = [0, 1, 18, 18, 45]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    # flash-attn's varlen layout: (H, T).
    lse = torch.cat([_row_lse(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), 80 ** -0.5)
                     for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
    got = ops.qk_scores(q, k, 80 ** -0.5, 0, cu_seqlens, lse)
    want = reference.qk_scores(q.cpu(), k.cpu(), 80 ** -0.5, 0, cu_seqlens.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)


def test_qk_scores_matches_attention_scores_of_softmax():
    q, k = _qk((1, 2, 21, 64), seed=25)
    probs = torch.softmax(q.double() @ k.double().mT * 0.125, dim=-1).float()
    torch.testing.assert_close(ops.qk_scores(q, k, 0.125, 1), ops.attention_scores(probs, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k: ops.qk_scores(q, k[..., :8], 1.0), ValueError, "k shape"),
    (lambda q, k: ops.qk_scores(q, k.half(), 1.0), TypeError, "k dtype"),
    (lambda q, k: ops.qk_scores(q, k, math.inf), ValueError, "scale"),
    (lambda q, k: ops.qk_scores(q, k, 1.0, 5), ValueError, "num_prefix"),
    (lambda q, k: ops.qk_scores(q[0], k[0], 1.0, 0, torch.tensor([0, 2], dtype=torch.int64)), TypeError,
     "cu_seqlens"),
    (lambda q, k: ops.qk_scores(q[0], k[0], 1.0, 0, torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     "cu_seqlens"),
    (lambda q, k: ops.qk_scores(q.int(), k.int(), 1.0), TypeError, "q"),
    (lambda q, k: ops.qk_scores(q, k, 1.0, 0, None, torch.zeros(1, 2, 4, device=q.device)), ValueError, "lse"),
    (lambda q, k: ops.qk_scores(q, k, 1.0, 0, None, torch.zeros(1, 2, 5, device=q.device).double()), TypeError,
     "lse"),
])
def test_qk_scores_bad_input(call, error, match):
    q, k = _qk((1, 2, 5, 16))
    if DEVICE == "cuda" and "cu_seqlens" in match:
        q, k = q.cpu(), k.cpu()
    with pytest.raises(error, match=match):
        call(q, k)


# ------------------------------------------------------------------------------------------ compiled (no GPU)

def _cuda_compiler_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _cuda_compiler_present(), reason="Triton has no CUDA backend here")
def test_kernels_compile_for_sm90():
    """The interpreter runs code the compiler rejects: compile every kernel for an H100, no GPU needed."""
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _triton_pipeline(features, object_attn, deep_attn, q, k, lse):
    kept, indices = ops.prune(features, object_attn, deep_attn, 20, 7, 7, 0.5, 1)
    roles = ops.select_with_roles(object_attn, deep_attn, 20, 7, 7, 0.5, 1)[1]
    return (kept, indices, roles, ops.qk_scores(q, k, 0.125, 1), ops.qk_scores(q, k, 0.125, 1, None, lse),
            ops.attention_scores(object_attn, 1))


def _triton_pipeline_inputs(device):
    object_attn = random_maps(2, 4, 50, seed=35, device=device)
    deep_attn = random_maps(2, 4, 50, seed=36, device=device)
    features = torch.randn(2, 49, 8, device=device)
    q, k = _qk((2, 4, 50, 64), seed=37)
    return features, object_attn, deep_attn, q.to(device), k.to(device), _row_lse(q, k, 0.125).to(device)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA run compiles with inductor (TestTritonCuda)")
def test_dynamo_captures_every_triton_op_in_one_graph():
    # Under the interpreter the kernels cannot be traced by AOT autograd (they run eagerly on fake tensors), so
    # this checks Dynamo's part: fullgraph=True fails on any graph break in the Triton path.
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    inputs = _triton_pipeline_inputs(DEVICE)
    compiled = torch.compile(_triton_pipeline, backend=counter, fullgraph=True, dynamic=True)
    for got, want in zip(compiled(*inputs), _triton_pipeline(*inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------------------------- CUDA only

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestTritonCuda:
    def test_large_grid_matches_reference(self):
        # 96 x 96 = 9216 tokens: beyond SORT_MAX_N, so the radix select on the real path.
        object_scores, deep_scores = random_scores(2, 9216, seed=30, device="cuda"), random_scores(2, 9216, seed=31,
                                                                                                   device="cuda")
        object_scores[0, :4000] = 0.5
        for budget, alpha in ((1, 0.1), (3000, 0.1), (3000, 1.0), (9216, 1.0)):
            assert_same_selection(object_scores, deep_scores, budget, 96, 96, alpha)

    def test_llava_shapes(self):
        object_attn = random_maps(2, 16, 577, dtype=torch.float16, seed=32, device="cuda")
        deep_attn = random_maps(2, 16, 577, dtype=torch.float16, seed=33, device="cuda")
        for budget in (64, 128, 192):
            assert_same_selection(object_attn, deep_attn, budget, 24, 24, 0.1, 1)
            assert_same_selection(object_attn, deep_attn, budget, 24, 24, 0.1, 1, "cross", True)
        q, k = _qk((2, 16, 577, 64), torch.bfloat16, seed=34)
        torch.testing.assert_close(ops.qk_scores(q, k, 0.125, 1).cpu(),
                                   reference.qk_scores(q.cpu(), k.cpu(), 0.125, 1), rtol=2e-3, atol=1e-6)

    def test_opcheck(self):
        scores = random_scores(2, 16, seed=38, device="cuda")
        maps = random_maps(2, 2, 17, seed=39, device="cuda")
        q, k = _qk((2, 2, 9, 64), seed=40)
        torch.library.opcheck(ops.attention_scores, (maps, 1))
        torch.library.opcheck(ops.qk_scores, (q, k, 0.125, 1))
        torch.library.opcheck(ops.select, (maps, scores, 6, 4, 4, 0.5, 1))
        torch.library.opcheck(ops.select_with_roles, (scores, maps, 6, 4, 4, 0.5, 1, "square"))
        torch.library.opcheck(ops.prune, (torch.randn(2, 16, 8, device="cuda"), maps, maps, 6, 4, 4, 0.5, 1))

    @pytest.mark.parametrize("dynamic", [False, True])
    def test_torch_compile_fullgraph(self, dynamic):
        inputs = _triton_pipeline_inputs("cuda")
        compiled = torch.compile(_triton_pipeline, fullgraph=True, dynamic=dynamic)
        for got, want in zip(compiled(*inputs), _triton_pipeline(*inputs)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
