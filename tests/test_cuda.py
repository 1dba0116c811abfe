"""CUDA kernels of the hiprune ops: registration (checked on any machine that built them) and agreement with the
CPU kernel bit for bit on indices and roles (GPU only: skipped without a CUDA device)."""

import glob
import os

import pytest
import torch

import hiprune_ops
from conftest import random_maps, random_scores
from hiprune_ops import _validation
from hiprune_ops.backend import extension_loaded, has_cpp_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))}
COMPARED_DEVICES = ("cpu", "cuda")  # the CPU kernel is the truth the CUDA kernel is held to
OPS = ("attention_scores", "qk_scores", "select", "select_with_roles", "prune", "prompt_select")


def _cuda_build_expected() -> bool:
    """True when this build must contain the CUDA kernels: HIPRUNE_EXPECT_CUDA=1 (CI), or the conditions under
    which setup.py compiles csrc/cuda (a CUDA build of torch, nvcc, CUDA sources, HIPRUNE_CUDA not off)."""
    if os.environ.get("HIPRUNE_EXPECT_CUDA") == "1":
        return True
    if os.environ.get("HIPRUNE_CUDA", "auto").lower() in ("0", "false", "no", "off"):
        return False
    from torch.utils import cpp_extension
    return bool(CUDA_SOURCES) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    if not _cuda_build_expected():
        pytest.skip("this build has no CUDA kernels (no CUDA torch, nvcc or csrc/cuda; set HIPRUNE_EXPECT_CUDA=1)")
    assert extension_loaded(), "hiprune_ops._C did not load"
    if op not in CUDA_SOURCES:
        pytest.skip(f"csrc/cuda/{op}.cu is not in this branch")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hiprune::{op}", "CUDA"), (
        f"hiprune::{op} has no CUDA kernel: rebuild with `make build`")


# Everything below runs kernels on a GPU.
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _need_kernels(*ops):
    for op in ops:
        if not (has_cpp_kernel(op, "cuda") and has_cpp_kernel(op, "cpu")):
            pytest.skip(f"hiprune::{op} lacks a CPU or CUDA kernel in this build")


def _select_both(object_attn, deep_attn, *args, **kwargs):
    """(CPU kernel result, CUDA kernel result moved to the CPU) of select_with_roles, or both errors' texts."""
    outcomes = []
    for device in COMPARED_DEVICES:
        try:
            indices, roles = torch.ops.hiprune.select_with_roles(object_attn.to(device), deep_attn.to(device), *args,
                                                                 **kwargs)
            outcomes.append((indices.cpu(), roles.cpu()))
        except ValueError as error:
            outcomes.append(str(error))
    return outcomes


def _assert_same_selection(object_attn, deep_attn, *args, **kwargs):
    cpu, cuda = _select_both(object_attn, deep_attn, *args, **kwargs)
    if isinstance(cpu, str) or isinstance(cuda, str):
        # Official-mode overflow: both raise, and like the reference they report the batch's largest kept count.
        assert isinstance(cpu, str) and isinstance(cuda, str), (cpu, cuda)
        with pytest.raises(ValueError) as reference_error:
            hiprune_ops.reference.select_with_roles(object_attn, deep_attn, *args, **kwargs)
        assert cuda == str(reference_error.value) == cpu
        return
    assert torch.equal(cpu[0], cuda[0]), "indices differ"
    assert torch.equal(cpu[1], cuda[1]), "roles differ"
    assert cuda[0].dtype == torch.int64 and cuda[1].dtype == torch.int8


GRIDS = [(1, 1), (4, 4), (5, 7), (14, 14), (24, 24)]


def _budgets(n):
    return sorted({1, n} | {b for b in (64, 128, 192) if b <= n})


@needs_gpu
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_select_matches_cpu_on_maps(grid, num_prefix):
    _need_kernels("select_with_roles")
    grid_h, grid_w = grid
    n = grid_h * grid_w
    for batch in (1, 3, 8):
        object_attn = random_maps(batch, 2, n + num_prefix, seed=batch, temperature=3.0)
        deep_attn = random_maps(batch, 2, n + num_prefix, seed=100 + batch, temperature=3.0)
        for budget in _budgets(n):
            for alpha in (0.0, 0.1, 1.0):
                for neighborhood in ("cross", "square"):
                    _assert_same_selection(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix,
                                           neighborhood, False)
                _assert_same_selection(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, "cross",
                                       True)


@needs_gpu
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_select_matches_cpu_on_scores_with_ties_and_nan(grid):
    _need_kernels("select_with_roles")
    grid_h, grid_w = grid
    n = grid_h * grid_w
    g = torch.Generator().manual_seed(n)
    for batch in (1, 2, 5):
        # Few distinct values, so most comparisons are ties; plus NaN and both zeros.
        object_scores = torch.randint(0, 4, (batch, n), generator=g).float() / 4
        deep_scores = torch.randint(0, 3, (batch, n), generator=g).float() - 1.0
        object_scores[:, ::5] = float("nan")
        deep_scores[:, 1::7] = -0.0
        deep_scores[:, 2::9] = float("nan")
        for budget in _budgets(n):
            for alpha in (0.0, 0.1, 1.0):
                for neighborhood, official in (("cross", False), ("square", False), ("cross", True)):
                    _assert_same_selection(object_scores, deep_scores, budget, grid_h, grid_w, alpha, 0, neighborhood,
                                           official)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_matches_cpu_in_half_precision(dtype):
    _need_kernels("select_with_roles", "attention_scores")
    object_attn = random_maps(4, 3, 197, dtype=dtype, seed=1)
    deep_attn = random_maps(4, 3, 197, dtype=dtype, seed=2)
    for budget in (64, 128, 192):
        _assert_same_selection(object_attn, deep_attn, budget, 14, 14, 0.1, 1, "cross", False)
    scores = torch.rand(4, 196, generator=torch.Generator().manual_seed(3)).to(dtype)
    _assert_same_selection(scores, scores.flip(1), 64, 14, 14, 0.1, 0, "square", False)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_scores_matches_cpu(dtype):
    _need_kernels("attention_scores")
    for batch, heads, length, num_prefix in ((1, 1, 1, 0), (2, 3, 50, 1), (3, 16, 577, 1), (1, 2, 1030, 6)):
        attn = random_maps(batch, heads, length, dtype=dtype, seed=length)
        expected = torch.ops.hiprune.attention_scores(attn, num_prefix)
        got = torch.ops.hiprune.attention_scores(attn.cuda(), num_prefix)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got.cpu(), expected)


@needs_gpu
def test_non_contiguous_inputs():
    _need_kernels("select_with_roles", "attention_scores", "prune")
    attn = random_maps(3, 4, 50, seed=7)
    # Same values, column stride != 1 (the strided path), and a batch-strided slice.
    strided = attn.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    assert strided.stride(3) != 1
    assert torch.equal(torch.ops.hiprune.attention_scores(strided, 1).cpu(),
                       torch.ops.hiprune.attention_scores(attn, 1))
    every_other = random_maps(6, 4, 50, seed=8)[::2]
    _assert_same_selection(every_other, attn, 12, 7, 7, 0.3, 1, "cross", False)
    cpu = torch.ops.hiprune.select_with_roles(every_other, attn, 12, 7, 7, 0.3, 1)
    gpu = torch.ops.hiprune.select_with_roles(every_other.cuda(), strided, 12, 7, 7, 0.3, 1)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    scores = random_scores(4, 98, seed=9)
    _assert_same_selection(scores[:, ::2], scores[:, 1::2], 10, 7, 7, 0.5, 0, "square", False)


@needs_gpu
@pytest.mark.parametrize("grid", [(130, 130), (7, 4000)], ids=["130x130", "7x4000"])
def test_large_grid_uses_global_workspace(grid):
    """N > 16384 takes the global-memory fallback; it must agree with the CPU kernel as well."""
    _need_kernels("select_with_roles")
    grid_h, grid_w = grid
    n = grid_h * grid_w
    object_scores = random_scores(2, n, seed=11)
    deep_scores = random_scores(2, n, seed=12)
    object_scores[0, :100] = 0.5  # ties
    for budget in (1, 640, n // 3, n):
        _assert_same_selection(object_scores, deep_scores, budget, grid_h, grid_w, 0.1, 0, "cross", False)
    _assert_same_selection(object_scores, deep_scores, 2000, grid_h, grid_w, 1.0, 0, "square", False)
    _assert_same_selection(object_scores, deep_scores, 2000, grid_h, grid_w, 0.1, 0, "cross", True)


@needs_gpu
def test_edge_cases():
    _need_kernels("select_with_roles", "select", "prune")
    empty = torch.empty(0, 16, device="cuda")
    assert torch.ops.hiprune.select(empty, empty, 4, 4, 4).shape == (0, 4)
    indices, roles = torch.ops.hiprune.select_with_roles(empty, empty, 4, 4, 4)
    assert indices.shape == (0, 4) and roles.shape == (0, 4)
    one = torch.rand(3, 1, device="cuda")
    assert torch.equal(torch.ops.hiprune.select(one, one, 1, 1, 1).cpu(), torch.zeros(3, 1, dtype=torch.int64))
    full = torch.ops.hiprune.select(torch.rand(2, 35, device="cuda"), torch.rand(2, 35, device="cuda"), 35, 5, 7)
    assert torch.equal(full.cpu(), torch.arange(35).expand(2, 35))


@needs_gpu
def test_official_overflow_raises_like_cpu():
    _need_kernels("select_with_roles")
    scores = torch.arange(49, dtype=torch.float32).remainder(7).unsqueeze(0).repeat(2, 1)
    # budget 10, alpha 1: 2 anchors, up to 10 kept: fits; alpha 1 with budget 4 -> 1 anchor, 5 kept > 4.
    cpu, cuda = _select_both(scores, scores, 4, 7, 7, 1.0, 0, "cross", True)
    assert isinstance(cuda, str) and cuda == cpu
    assert cuda == _validation.official_overflow_message(5, 4)
    _assert_same_selection(scores, scores, 10, 7, 7, 1.0, 0, "cross", True)


@needs_gpu
def test_wrong_device_arguments():
    _need_kernels("select_with_roles", "prune")
    scores = torch.rand(2, 16)
    with pytest.raises(ValueError, match="deep_attn is on"):
        torch.ops.hiprune.select_with_roles(scores, scores.cuda(), 4, 4, 4)
    with pytest.raises(ValueError, match="features is on"):
        torch.ops.hiprune.prune(torch.rand(2, 16, 3), scores.cuda(), scores.cuda(), 4, 4, 4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_matches_cpu(dtype):
    _need_kernels("prune")
    object_attn = random_maps(2, 2, 37, seed=21)
    deep_attn = random_maps(2, 2, 37, seed=22)
    features = torch.randn(2, 36, 5, generator=torch.Generator().manual_seed(23)).to(dtype)
    kept, indices = torch.ops.hiprune.prune(features, object_attn, deep_attn, 12, 6, 6, 0.4, 1)
    kept_gpu, indices_gpu = torch.ops.hiprune.prune(features.cuda(), object_attn.cuda(), deep_attn.cuda(), 12, 6, 6,
                                                    0.4, 1)
    assert torch.equal(indices, indices_gpu.cpu())
    assert kept_gpu.dtype == dtype and torch.equal(kept, kept_gpu.cpu())


def _gpu_inputs(seed):
    return random_maps(2, 4, 197, seed=seed, device="cuda"), random_maps(2, 4, 197, seed=seed + 1, device="cuda")


@needs_gpu
def test_cuda_graph_capture_and_replay():
    _need_kernels("select_with_roles", "prune")
    object_attn, deep_attn = _gpu_inputs(31)
    features = torch.randn(2, 196, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (workspaces, shared-memory opt-in) outside the capture
        torch.ops.hiprune.select_with_roles(object_attn, deep_attn, 64, 14, 14, 0.1, 1)
        torch.ops.hiprune.prune(features, object_attn, deep_attn, 64, 14, 14, 0.1, 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        indices, roles = torch.ops.hiprune.select_with_roles(object_attn, deep_attn, 64, 14, 14, 0.1, 1)
        kept, _ = torch.ops.hiprune.prune(features, object_attn, deep_attn, 64, 14, 14, 0.1, 1)
    for seed in (32, 33):
        new_object, new_deep = _gpu_inputs(seed)
        object_attn.copy_(new_object)
        deep_attn.copy_(new_deep)
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.ops.hiprune.select_with_roles(new_object.cpu(), new_deep.cpu(), 64, 14, 14, 0.1, 1)
        assert torch.equal(indices.cpu(), expected[0]) and torch.equal(roles.cpu(), expected[1])
        assert torch.equal(kept, features.gather(1, indices.unsqueeze(-1).expand(-1, -1, 8)))


@needs_gpu
def test_torch_compile_reduce_overhead():
    _need_kernels("select", "prune")

    def pruned(features, object_attn, deep_attn):
        indices = torch.ops.hiprune.select(object_attn, deep_attn, 64, 14, 14, 0.1, 1)
        kept, _ = torch.ops.hiprune.prune(features, object_attn, deep_attn, 64, 14, 14, 0.1, 1)
        return indices, kept * 2

    compiled = torch.compile(pruned, mode="reduce-overhead", fullgraph=True)
    features = torch.randn(2, 196, 8, device="cuda")
    for seed in (41, 42, 43):  # the later calls replay the recorded graph
        object_attn, deep_attn = _gpu_inputs(seed)
        got_indices, got_kept = compiled(features, object_attn, deep_attn)
        want_indices, want_kept = pruned(features, object_attn, deep_attn)
        assert torch.equal(got_indices, want_indices) and torch.equal(got_kept, want_kept)


@needs_gpu
def test_runs_on_the_current_non_default_stream():
    _need_kernels("select_with_roles", "attention_scores")
    object_attn, deep_attn = _gpu_inputs(51)
    expected = torch.ops.hiprune.select_with_roles(object_attn.cpu(), deep_attn.cpu(), 128, 14, 14, 0.1, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scores = torch.ops.hiprune.attention_scores(object_attn, 1)
        indices, roles = torch.ops.hiprune.select_with_roles(object_attn, deep_attn, 128, 14, 14, 0.1, 1)
    stream.synchronize()
    assert torch.equal(scores.cpu(), torch.ops.hiprune.attention_scores(object_attn.cpu(), 1))
    assert torch.equal(indices.cpu(), expected[0]) and torch.equal(roles.cpu(), expected[1])


@needs_gpu
def test_opcheck_on_cuda():
    _need_kernels("attention_scores", "select", "select_with_roles", "prune")
    object_attn = random_maps(2, 2, 50, seed=61, device="cuda")
    deep_attn = random_maps(2, 2, 50, seed=62, device="cuda")
    features = torch.randn(2, 49, 4, device="cuda")
    select_args = (object_attn, deep_attn, 16, 7, 7, 0.3, 1)
    torch.library.opcheck(torch.ops.hiprune.attention_scores.default, (object_attn, 1))
    torch.library.opcheck(torch.ops.hiprune.select.default, select_args)
    torch.library.opcheck(torch.ops.hiprune.select_with_roles.default, select_args)
    torch.library.opcheck(torch.ops.hiprune.prune.default, (features,) + select_args)
    scores = random_scores(2, 49, seed=63, device="cuda")
    torch.library.opcheck(torch.ops.hiprune.select_with_roles.default, (scores, scores, 16, 7, 7, 0.3, 0, "square"))


def _row_lse(q, k, scale):
    """Natural-log LSE of each query row (float32, (B, H, L)) from a float64 map on the CPU."""
    return torch.logsumexp(q.cpu().double() @ k.cpu().double().mT * scale, dim=-1).float()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qk_scores_with_lse_matches_cpu(dtype):
    _need_kernels("qk_scores")
    g = torch.Generator().manual_seed(70)
    for batch, heads, length, dim, num_prefix in ((1, 1, 1, 64, 0), (2, 3, 70, 80, 1), (2, 16, 577, 64, 1)):
        q, k = (torch.randn(batch, heads, length, dim, generator=g).to(dtype) for _ in range(2))
        lse = _row_lse(q, k, dim ** -0.5)
        expected = torch.ops.hiprune.qk_scores(q, k, dim ** -0.5, num_prefix)
        got = torch.ops.hiprune.qk_scores(q.cuda(), k.cuda(), dim ** -0.5, num_prefix, None, lse.cuda())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-7)


@needs_gpu
def test_qk_scores_with_lse_varlen_matches_cpu():
    _need_kernels("qk_scores")
    g = torch.Generator().manual_seed(71)
    q, k = (torch.randn(150, 4, 80, generator=g) for _ in range(2))
    bounds = [0, 1, 64, 64, 150]
    cu = torch.tensor(bounds, dtype=torch.int32)
    lse = torch.cat([_row_lse(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), 80 ** -0.5)
                     for s, e in zip(bounds[:-1], bounds[1:])], dim=1)  # (H, T)
    expected = torch.ops.hiprune.qk_scores(q, k, 80 ** -0.5, 0, cu)
    got = torch.ops.hiprune.qk_scores(q.cuda(), k.cuda(), 80 ** -0.5, 0, cu.cuda(), lse.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-7)


@needs_gpu
def test_qk_scores_takes_the_lse_of_torch_attention_kernels():
    # Flash attention's lse is (B, H, L); memory-efficient attention pads L to a multiple of 32: a strided slice.
    _need_kernels("qk_scores")
    q, k, v = (torch.randn(2, 16, 577, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = torch.ops.hiprune.qk_scores(q.cpu(), k.cpu(), 0.125, 1)
    flash_lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=0.125)[1]
    efficient_lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=0.125)[1]
    for lse in (flash_lse, efficient_lse[..., :577]):
        got = torch.ops.hiprune.qk_scores(q, k, 0.125, 1, None, lse)
        torch.testing.assert_close(got.cpu(), expected, rtol=2e-3, atol=1e-7)


@needs_gpu
def test_opcheck_qk_scores_with_lse_on_cuda():
    _need_kernels("qk_scores")
    g = torch.Generator().manual_seed(72)
    q, k = (torch.randn(2, 2, 17, 64, generator=g) for _ in range(2))
    lse = _row_lse(q, k, 0.125)
    torch.library.opcheck(torch.ops.hiprune.qk_scores.default, (q.cuda(), k.cuda(), 0.125, 1, None, lse.cuda()))
