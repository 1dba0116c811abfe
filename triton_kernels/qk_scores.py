"""hiprune_triton::qk_scores: received attention straight from q and k, flash style, never an (L, L) buffer.

Domains: dense inputs have one per (image b, head h), its L tokens; packed ones one per head over the T tokens,
each row seeing only the keys of its own segment (found on the device from cu_seqlens: the host never reads it).
- Pass 1 (skipped when the caller gives lse): one program per (query block, domain) streams the key blocks and
  keeps each row's running max and sum: the row's log2-sum-exp2.
- Pass 2, in the loop order of flash attention's backward dK/dV: one program per (key block, domain) holds its keys
  and their column sums in registers and streams every query block of the domain, so no atomics are needed. Per
  element: one dot-product share on the tensor cores (bf16/fp16 inputs, float32 accumulation), one FMA
  (logit * scale * log2(e) - lse), one exp2, one add. Query rows past the end load lse = +inf and add nothing.
- The host sums the heads in a fixed order (deterministic) and divides.
Head dims that are not a power of two run as two dots (80 = 64 + 16, 96 = 64 + 32) instead of one padded to 128.
Block sizes, warps and stages are autotuned per (length, head dim, dtype). Extra memory: O(T * H) floats.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .. import ops
from ._common import check_device, interpreting

LOG2E = math.log2(math.e)


def _configs():
    if interpreting():  # every config would run in the CPU interpreter: one small one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in ((64, 64), (64, 128), (128, 64), (128, 128), (32, 64))
            for w in (4, 8) for s in (2, 3)
            if not (w == 8 and m * n < 8192)]


@triton.jit
def _load_tile(base, rows, row_mask, s_row, s_d, d0, n_dims, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Rows x channels [d0, d0 + BLOCK_D) of q or k (zeros outside)."""
    dims = d0 + tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * s_row + dims.to(tl.int64)[None, :] * s_d
    x = tl.load(ptrs, mask=row_mask[:, None] & (dims < n_dims)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_chunks(base, rows, row_mask, s_row, s_d, n_dims, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Both channel chunks of a q or k tile; the second repeats the first (unused) when BLOCK_D1 == 0."""
    x0 = _load_tile(base, rows, row_mask, s_row, s_d, 0, n_dims, BLOCK_D0, UPCAST)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = _load_tile(base, rows, row_mask, s_row, s_d, BLOCK_D0, n_dims, BLOCK_D1, UPCAST)
    return x0, x1


@triton.jit
def _head_base(ptr, domain, heads, s_z, s_h):
    """Start of domain's (image, head) slice of q, k or lse."""
    return ptr + (domain // heads) * s_z + (domain % heads) * s_h


@triton.jit
def _program_tokens(cu_ptr, n_bounds, length, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of tokens t and their mask; each one's segment [start, end) (packed), or the whole
    domain (dense); and [first, last), the tokens that any of them sees."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t_mask = t < length
    start = tl.zeros_like(t)
    end = tl.zeros_like(t) + length
    if VARLEN:
        for i in range(0, n_bounds):
            bound = tl.load(cu_ptr + i)
            bound = tl.minimum(tl.maximum(bound, 0), length)  # bad values stay in bounds
            start = tl.where(bound <= t, tl.maximum(start, bound), start)
            end = tl.where(bound > t, tl.minimum(end, bound), end)
    first = tl.min(tl.where(t_mask, start, length), axis=0)
    last = tl.max(tl.where(t_mask, end, 0), axis=0)
    return t, t_mask, start, end, first, last


@triton.jit
def _logits(q0, q1, k0, k1, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr):
    """q @ k^T over both channel chunks, float32."""
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if BLOCK_D1 > 0:
        s = tl.dot(q1, tl.trans(k1), acc=s, input_precision=PRECISION)
    return s


@triton.autotune(configs=_configs(), key=["length", "n_dims"])
@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, cu_ptr, n_bounds, length, heads, n_dims, scale_log2,
                    q_sz, q_sh, q_sl, q_sd, k_sz, k_sh, k_sl, k_sd, VARLEN: tl.constexpr, BLOCK_D0: tl.constexpr,
                    BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    domain = tl.program_id(1).to(tl.int64)
    q_base = _head_base(q_ptr, domain, heads, q_sz, q_sh)
    k_base = _head_base(k_ptr, domain, heads, k_sz, k_sh)
    rows, row_mask, start, end, first, last = _program_tokens(cu_ptr, n_bounds, length, VARLEN, BLOCK_M)
    q0, q1 = _load_chunks(q_base, rows, row_mask, q_sl, q_sd, n_dims, BLOCK_D0, BLOCK_D1, UPCAST)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for k_start in range(first, last, BLOCK_N):
        cols = k_start + tl.arange(0, BLOCK_N)
        col_mask = cols < last
        k0, k1 = _load_chunks(k_base, cols, col_mask, k_sl, k_sd, n_dims, BLOCK_D0, BLOCK_D1, UPCAST)
        s = _logits(q0, q1, k0, k1, BLOCK_D1, PRECISION) * scale_log2
        if VARLEN:
            s = tl.where((cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None]), s, float("-inf"))
        else:
            s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid -inf - -inf
        l = l * tl.exp2(m - base) + tl.sum(tl.exp2(s - base[:, None]), axis=1)
        m = m_new
    lse = m + tl.log2(tl.where(row_mask, l, 1.0))
    tl.store(lse_ptr + domain * length + rows, lse, mask=row_mask)


@triton.autotune(configs=_configs(), key=["length", "n_dims"])
@triton.jit
def _column_sums_kernel(q_ptr, k_ptr, lse_ptr, colsum_ptr, cu_ptr, n_bounds, length, heads, n_dims, scale_log2,
                        lse_to_log2, q_sz, q_sh, q_sl, q_sd, k_sz, k_sh, k_sl, k_sd, lse_sz, lse_sh, lse_sl,
                        VARLEN: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    domain = tl.program_id(1).to(tl.int64)
    q_base = _head_base(q_ptr, domain, heads, q_sz, q_sh)
    k_base = _head_base(k_ptr, domain, heads, k_sz, k_sh)
    lse_base = _head_base(lse_ptr, domain, heads, lse_sz, lse_sh)
    cols, col_mask, start, end, first, last = _program_tokens(cu_ptr, n_bounds, length, VARLEN, BLOCK_N)
    k0, k1 = _load_chunks(k_base, cols, col_mask, k_sl, k_sd, n_dims, BLOCK_D0, BLOCK_D1, UPCAST)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for q_start in range(first, last, BLOCK_M):
        rows = q_start + tl.arange(0, BLOCK_M)
        row_mask = rows < last
        q0, q1 = _load_chunks(q_base, rows, row_mask, q_sl, q_sd, n_dims, BLOCK_D0, BLOCK_D1, UPCAST)
        # Rows past the end: lse = +inf, so exp2(-inf) = 0.
        lse = tl.load(lse_base + rows.to(tl.int64) * lse_sl, mask=row_mask, other=float("inf")) * lse_to_log2
        s = _logits(q0, q1, k0, k1, BLOCK_D1, PRECISION) * scale_log2 - lse[:, None]
        if VARLEN:  # a query sees a key exactly when it lies in the key's segment
            s = tl.where((rows[:, None] >= start[None, :]) & (rows[:, None] < end[None, :]), s, float("-inf"))
        acc += tl.sum(tl.exp2(s), axis=0)
    count = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(colsum_ptr + domain * length + cols, acc / count, mask=col_mask)


def channel_chunks(n_dims: int) -> tuple[int, int]:
    """Two power-of-two chunks covering n_dims channels (tl.dot needs >= 16): 80 -> (64, 16), 128 -> (128, 0)."""
    first = max(16, 1 << (n_dims.bit_length() - 1))
    rest = n_dims - first
    return first, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def launch_qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
                     cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    v.check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse)
    check_device(q, "q")
    varlen = cu_seqlens is not None
    if varlen:  # one domain per head over all T tokens
        length, heads, n_dims = q.shape
        batch = 1
        q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
        k_strides = (0, k.stride(1), k.stride(0), k.stride(2))
        n_bounds, cu = cu_seqlens.shape[0], cu_seqlens
    else:  # one domain per (image, head)
        batch, heads, length, n_dims = q.shape
        q_strides, k_strides = q.stride(), k.stride()
        n_bounds, cu = 0, q  # any pointer: never read
    colsum = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    if batch > 0 and length > 0:
        block_d0, block_d1 = channel_chunks(n_dims)
        # The interpreter's bf16 tl.dot is wrong (Triton 3.8): there the tiles go through float32.
        upcast = interpreting() and q.dtype == torch.bfloat16
        common = dict(VARLEN=varlen, BLOCK_D0=block_d0, BLOCK_D1=block_d1, UPCAST=upcast,
                      PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32")
        scale_log2 = scale * LOG2E
        domains = batch * heads
        if lse is None:
            row_lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)  # base 2
            lse_strides, lse_to_log2 = row_lse.stride(), 1.0
            torch.library.wrap_triton(_row_lse_kernel)[lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), domains)](
                q, k, row_lse, cu, n_bounds, length, heads, n_dims, scale_log2, *q_strides, *k_strides, **common)
        else:  # natural log: (B, H, L), or (H, T) packed
            row_lse, lse_to_log2 = lse, LOG2E
            lse_strides = (0, *lse.stride()) if varlen else lse.stride()
        torch.library.wrap_triton(_column_sums_kernel)[lambda meta: (triton.cdiv(length, meta["BLOCK_N"]), domains)](
            q, k, row_lse, colsum, cu, n_bounds, length, heads, n_dims, scale_log2, lse_to_log2, *q_strides,
            *k_strides, *lse_strides, **common)
    scores = colsum.sum(dim=1) / heads  # a fixed reduction order: deterministic
    if varlen:
        return scores[0]
    return scores[:, num_prefix:].contiguous()


@torch.library.triton_op("hiprune_triton::qk_scores", mutates_args=())
def qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
              cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attention_scores(softmax(q @ k^T * scale), num_prefix) without the (L, L) map; packed with cu_seqlens;
    one pass instead of two with the rows' lse."""
    return launch_qk_scores(q, k, scale, num_prefix, cu_seqlens, lse)


# Shapes only, the same fake as torch.ops.hiprune.qk_scores (the interpreter cannot trace the op itself).
qk_scores.register_fake(ops.qk_scores_fake)
