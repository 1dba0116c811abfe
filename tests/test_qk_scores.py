"""qk_scores: received attention from q and k, checked against softmax(q @ k^T * scale) reduced in float64."""

import math

import pytest
import torch

import hiprune_ops
from hiprune_ops.backend import has_cpp_kernel

from conftest import backend_params

BACKENDS = backend_params("qk_scores")


def truth(q, k, scale, num_prefix=0, cu_seqlens=None):
    """The dense map in float64: mean over heads and query rows of each key column (float64 result)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [truth(q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0), scale)[0]
                  for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    qd, kd = q.cpu().double(), k.cpu().double()
    probs = torch.softmax(torch.matmul(qd, kd.transpose(-1, -2)) * scale, dim=-1)
    return probs.mean(dim=(1, 2))[:, num_prefix:]


def make_qk(shape, dtype=torch.float32, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*shape, generator=g) * spread).to(dtype)
    k = (torch.randn(*shape, generator=g) * spread).to(dtype)
    return q, k


def row_lse(q, k, scale, cu_seqlens=None):
    """Each query row's natural-log log-sum-exp, float32: (B, H, L), or (H, T) packed as flash-attn lays it out."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [row_lse(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], scale)[0]
                  for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(pieces, dim=1)
    logits = torch.matmul(q.cpu().double(), k.cpu().double().transpose(-1, -2)) * scale
    return torch.logsumexp(logits, dim=-1).float()


def run(backend, device, q, k, scale, num_prefix=0, cu_seqlens=None, lse=None):
    cu = None if cu_seqlens is None else cu_seqlens.to(device)
    lse = None if lse is None else lse.to(device)
    return hiprune_ops.qk_scores(q.to(device), k.to(device), scale, num_prefix, cu, lse, backend=backend)


def assert_matches(out, expected):
    assert out.dtype == torch.float32
    assert out.shape == expected.shape
    # Every backend accumulates in float32: a few float32 roundings per score.
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-5, atol=1e-9)


# (B, H, L, D, num_prefix): L = 1; L that is a multiple of no block size; B, H > 1; a CLS prefix.
SHAPES = [
    (1, 1, 1, 64, 0),
    (2, 3, 1, 80, 0),
    (2, 3, 67, 64, 0),
    (1, 2, 130, 80, 1),
    (3, 2, 45, 128, 5),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch,heads,length,dim,num_prefix", SHAPES)
def test_matches_dense_softmax(backend, device, batch, heads, length, dim, num_prefix):
    q, k = make_qk((batch, heads, length, dim), seed=length)
    scale = dim ** -0.5
    out = run(backend, device, q, k, scale, num_prefix)
    assert out.device.type == device
    assert_matches(out, truth(q, k, scale, num_prefix))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_half_inputs_accumulate_in_float32(backend, device, dtype, dim):
    q, k = make_qk((2, 2, 37, dim), dtype=dtype, seed=dim)
    out = run(backend, device, q, k, dim ** -0.5, 1)
    assert_matches(out, truth(q, k, dim ** -0.5, 1))  # truth sees the same rounded inputs


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_heads_long_rows(backend, device):
    # batch * heads >= 64 and L > 256: a task walks several row blocks, the last one partial.
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("sized for the C++ row blocking; minutes in the Triton interpreter")
    q, k = make_qk((1, 64, 300, 16), seed=3)
    assert_matches(run(backend, device, q, k, 0.25), truth(q, k, 0.25))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_runs_under_inference_mode(backend, device):
    # Models run under torch.inference_mode(); the kernel's worker threads must see it too.
    q, k = make_qk((2, 4, 70, 64), seed=11)
    with torch.inference_mode():
        out = run(backend, device, q, k, 0.125, 1)
    assert_matches(out, truth(q, k, 0.125, 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_logits_are_stable(backend, device):
    # Logits in the hundreds overflow exp() unless each row's max is taken out first.
    q, k = make_qk((1, 2, 50, 64), seed=5, spread=6.0)
    out = run(backend, device, q, k, 1.0)
    assert torch.isfinite(out).all()
    assert_matches(out, truth(q, k, 1.0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_scale_gives_uniform_attention(backend, device):
    q, k = make_qk((2, 3, 40, 64), seed=6)
    out = run(backend, device, q, k, 0.0, 4)
    torch.testing.assert_close(out.cpu(), torch.full((2, 36), 1 / 40), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_scale(backend, device):
    q, k = make_qk((1, 2, 33, 64), seed=7)
    assert_matches(run(backend, device, q, k, -0.3), truth(q, k, -0.3))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs(backend, device):
    # (B, L, H, D) transposed to (B, H, L, D), as attention layers produce it; k strided in D as well.
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 70, 3, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 70, 3, 128, generator=g).transpose(1, 2)[..., ::2]
    assert not q.is_contiguous() and k.stride(-1) == 2
    assert_matches(run(backend, device, q, k, 0.125, 1), truth(q, k, 0.125, 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agrees_with_attention_scores_of_the_map(backend, device):
    q, k = make_qk((2, 2, 29, 64), seed=9)
    attn = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)
    expected = hiprune_ops.reference.attention_scores(attn, 1)
    torch.testing.assert_close(run(backend, device, q, k, 0.125, 1).cpu(), expected, rtol=1e-5, atol=1e-8)


# Packed sequences: uneven segments, one of length 1, an empty one (cu_seqlens may repeat a value).
VARLEN = [
    [0, 23],
    [0, 1, 18, 18, 50, 117],
    [0, 40, 41],
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bounds", VARLEN, ids=lambda b: "-".join(map(str, b)))
def test_varlen_matches_per_segment_softmax(backend, device, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k = make_qk((bounds[-1], 3, 80), seed=len(bounds))
    out = run(backend, device, q, k, 80 ** -0.5, 0, cu)
    assert out.shape == (bounds[-1],)
    assert_matches(out, truth(q, k, 80 ** -0.5, 0, cu))
    # A segment of one token attends only to itself.
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s == 1:
            assert out[s].item() == 1.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen_segments_do_not_see_each_other(backend, device):
    # Each segment scored alone (as a batch of one) gives the same numbers as inside the pack.
    cu = torch.tensor([0, 30, 31, 75], dtype=torch.int32)
    q, k = make_qk((75, 2, 64), dtype=torch.bfloat16, seed=11)
    packed = run(backend, device, q, k, 0.125, 0, cu).cpu()
    for s, e in [(0, 30), (30, 31), (31, 75)]:
        alone = run(backend, device, q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], 0.125)[0].cpu()
        torch.testing.assert_close(packed[s:e], alone, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen_strided_tokens(backend, device):
    # Qwen2.5-VL splits one (T, 3, H, D) qkv tensor: q and k are strided views of it.
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(60, 3, 2, 64, generator=g)
    cu = torch.tensor([0, 16, 60], dtype=torch.int32)
    q, k = qkv[:, 0], qkv[:, 1]
    assert_matches(run(backend, device, q, k, 0.125, 0, cu), truth(q, k, 0.125, 0, cu))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    q, k = make_qk((0, 2, 10, 64))
    assert run(backend, device, q, k, 0.125, 1).shape == (0, 9)


# -- with the rows' lse: one pass, the same scores ------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch,heads,length,dim,num_prefix", SHAPES)
def test_lse_gives_the_two_pass_scores(backend, device, batch, heads, length, dim, num_prefix):
    q, k = make_qk((batch, heads, length, dim), seed=length + 1)
    scale = dim ** -0.5
    out = run(backend, device, q, k, scale, num_prefix, lse=row_lse(q, k, scale))
    assert_matches(out, truth(q, k, scale, num_prefix))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_with_half_inputs(backend, device, dtype):
    q, k = make_qk((2, 2, 37, 80), dtype=dtype, seed=21)
    out = run(backend, device, q, k, 80 ** -0.5, 1, lse=row_lse(q, k, 80 ** -0.5))
    assert_matches(out, truth(q, k, 80 ** -0.5, 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lse_is_used_not_recomputed(backend, device):
    # Every probability is exp(logit - lse): raising lse by log(2) halves every score.
    q, k = make_qk((2, 2, 30, 64), seed=22)
    out = run(backend, device, q, k, 0.125, 1, lse=row_lse(q, k, 0.125) + math.log(2.0))
    assert_matches(out, truth(q, k, 0.125, 1) / 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lse_strided(backend, device):
    # lse laid out (B, L, H) in memory and viewed as (B, H, L); q, k from a (B, L, H, D) layout.
    g = torch.Generator().manual_seed(23)
    q = torch.randn(2, 45, 3, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 45, 3, 64, generator=g).transpose(1, 2)
    lse = row_lse(q, k, 0.125).transpose(1, 2).contiguous().transpose(1, 2)
    assert not lse.is_contiguous()
    assert_matches(run(backend, device, q, k, 0.125, 2, lse=lse), truth(q, k, 0.125, 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bounds", VARLEN, ids=lambda b: "-".join(map(str, b)))
def test_lse_varlen(backend, device, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k = make_qk((bounds[-1], 3, 80), seed=len(bounds) + 1)
    lse = row_lse(q, k, 80 ** -0.5, cu)
    assert lse.shape == (3, bounds[-1])
    assert_matches(run(backend, device, q, k, 80 ** -0.5, 0, cu, lse), truth(q, k, 80 ** -0.5, 0, cu))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lse_large_logits(backend, device):
    # The one-pass path subtracts lse inside the float32 dot product: still stable for logits in the hundreds.
    q, k = make_qk((1, 2, 50, 64), seed=5, spread=6.0)
    out = run(backend, device, q, k, 1.0, lse=row_lse(q, k, 1.0))
    assert torch.isfinite(out).all()
    # A float32 lse of magnitude ~300 is itself rounded by ~2e-5: looser than the two-pass check.
    torch.testing.assert_close(out.cpu().double(), truth(q, k, 1.0), rtol=2e-4, atol=1e-7)


# Bad inputs: (arguments, error type, message fragment). Each message names the argument.
def _bad_cases():
    q, k = make_qk((2, 2, 10, 64))
    qp, kp = make_qk((12, 2, 64))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    lse, lse_packed = torch.zeros(2, 2, 10), torch.zeros(2, 12)
    return {
        "lse-shape": ((q, k, 0.1, 0, None, lse[:, :, :9]), ValueError, "lse must be (B, H, L) = (2, 2, 10)"),
        "lse-rank": ((q, k, 0.1, 0, None, lse[0]), ValueError, "lse must be (B, H, L)"),
        "lse-dtype": ((q, k, 0.1, 0, None, lse.double()), TypeError, "lse must be float32"),
        "lse-half": ((q, k, 0.1, 0, None, lse.half()), TypeError, "lse must be float32"),
        "lse-packed-layout": ((qp, kp, 0.1, 0, cu, lse_packed.t()), ValueError, "lse must be (H, T) = (2, 12)"),
        "lse-packed-dense": ((qp, kp, 0.1, 0, cu, lse_packed[None]), ValueError, "lse must be (H, T)"),
        "k-shape": ((q, k[:, :, :9], 0.1, 0, None), ValueError, "k shape"),
        "k-heads": ((q, k[:, :1], 0.1, 0, None), ValueError, "k shape"),
        "q-rank": ((q[0], k[0], 0.1, 0, None), ValueError, "q must be (B, H, L, D)"),
        "q-int": ((q.long(), k.long(), 0.1, 0, None), TypeError, "q must be float32"),
        "k-dtype": ((q, k.half(), 0.1, 0, None), TypeError, "k dtype"),
        "scale-nan": ((q, k, float("nan"), 0, None), ValueError, "scale"),
        "scale-inf": ((q, k, float("inf"), 0, None), ValueError, "scale"),
        "no-heads": ((q[:, :0], k[:, :0], 0.1, 0, None), ValueError, "at least one head"),
        "prefix-too-big": ((q, k, 0.1, 10, None), ValueError, "num_prefix"),
        "prefix-negative": ((q, k, 0.1, -1, None), ValueError, "num_prefix"),
        "varlen-rank": ((q, k, 0.1, 0, cu), ValueError, "q must be (T, H, D)"),
        "varlen-prefix": ((qp, kp, 0.1, 1, cu), ValueError, "num_prefix must be 0"),
        "cu-dtype": ((qp, kp, 0.1, 0, cu.long()), TypeError, "cu_seqlens must be int32"),
        "cu-2d": ((qp, kp, 0.1, 0, cu[None]), ValueError, "cu_seqlens must be 1-D"),
        "cu-short": ((qp, kp, 0.1, 0, cu[:1]), ValueError, "cu_seqlens must be 1-D"),
        "cu-end": ((qp, kp, 0.1, 0, torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError, "end at T = 12"),
        "cu-past-end": ((qp, kp, 0.1, 0, torch.tensor([0, 5, 13], dtype=torch.int32)), ValueError, "end at T"),
        "cu-start": ((qp, kp, 0.1, 0, torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError, "start at 0"),
        "cu-decreasing": ((qp, kp, 0.1, 0, torch.tensor([0, 7, 5, 12], dtype=torch.int32)), ValueError,
                          "non-decreasing"),
    }


# The GPU kernels (the torch reference reads cu_seqlens on the host, so it is not one of them).
GPU_KERNELS = [p for p in BACKENDS if p.values == ("cpp", "cuda") or p.values == ("triton", "cuda")]

# Checks of cu_seqlens values read them, which a GPU backend must not do (it would synchronise).
VALUE_CHECKS = {"cu-end", "cu-past-end", "cu-start", "cu-decreasing"}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_inputs_raise_naming_the_argument(backend, device, case):
    if device == "cuda" and case in VALUE_CHECKS:
        pytest.skip("cu_seqlens values are not read on the GPU")
    args, error, fragment = _bad_cases()[case]
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        run(backend, device, *args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_device_mismatch(backend, device):
    if device != "cuda":
        pytest.skip("needs a second device")
    q, k = make_qk((8, 2, 64))
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        hiprune_ops.qk_scores(q.cuda(), k.cuda(), 0.1, 0, torch.tensor([0, 8], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="k is on"):
        hiprune_ops.qk_scores(q[None].cuda(), k[None], 0.1, backend=backend)
    with pytest.raises(ValueError, match="lse is on"):
        hiprune_ops.qk_scores(q[None].cuda(), k[None].cuda(), 0.1, lse=torch.zeros(1, 8, 2), backend=backend)


@pytest.mark.parametrize("backend,device", GPU_KERNELS)
def test_gpu_stays_in_bounds_on_bad_cu_seqlens(backend, device):
    # The GPU cannot read cu_seqlens without a sync: it clamps them and must neither crash nor read out of bounds.
    q, k = make_qk((20, 2, 64))
    for bounds in ([0, 5, 3, 20], [-7, 4, 1000], [0, 30], [5, 5, 5], [0, 20, 2**31 - 1, -2**31]):
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        out = hiprune_ops.qk_scores(q.cuda(), k.cuda(), 0.1, 0, cu, backend=backend)
        torch.cuda.synchronize()
        assert out.shape == (20,)
    # A valid call afterwards still works (the context was not corrupted).
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    assert_matches(run(backend, device, q, k, 0.1, 0, cu), truth(q, k, 0.1, 0, cu))


@pytest.mark.parametrize("backend,device", GPU_KERNELS)
def test_gpu_makes_no_host_sync(backend, device):
    q, k = make_qk((2, 2, 100, 64))
    q, k = q.cuda(), k.cuda()
    qp, kp = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    cu = torch.tensor([0, 33, 100], dtype=torch.int32, device="cuda")
    hiprune_ops.qk_scores(q, k, 0.1, 1, backend=backend)  # compile / warm up outside the check
    hiprune_ops.qk_scores(qp, kp, 0.1, 0, cu, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hiprune_ops.qk_scores(q, k, 0.1, 1, backend=backend)
        hiprune_ops.qk_scores(qp, kp, 0.1, 0, cu, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cpu_result_does_not_depend_on_thread_count():
    if not has_cpp_kernel("qk_scores", "cpu"):
        pytest.skip("no C++ CPU kernel in this build")
    q, k = make_qk((1, 3, 200, 80), seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.hiprune.qk_scores(q, k, 0.1, 0)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.hiprune.qk_scores(q, k, 0.1, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


OPCHECK_DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available())]


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
def test_opcheck(device):
    if not has_cpp_kernel("qk_scores", device):
        pytest.skip(f"hiprune::qk_scores has no {device} kernel in this build")
    q, k = make_qk((2, 2, 17, 64))
    qp, kp = make_qk((17, 2, 64))
    cu = torch.tensor([0, 1, 9, 17], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (q.to(device), k.to(device), 0.125, 1, None))
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (qp.to(device), kp.to(device), 0.125, 0, cu))
    lse, lse_packed = row_lse(q, k, 0.125).to(device), row_lse(qp, kp, 0.125, cu.cpu()).to(device)
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (q.to(device), k.to(device), 0.125, 1, None, lse))
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (qp.to(device), kp.to(device), 0.125, 0, cu, lse_packed))

