"""hiprune_triton::qk_scores: received attention straight from q and k, flash style, never an (L, L) buffer.

Rows are flattened to t in [0, T) (dense: T = B * L, t = b * L + l; packed: the T tokens), and every row attends to
the keys of its own segment [start(t), end(t)) (dense: its image; packed: found on the device from cu_seqlens,
so the host never reads it). Pass 1: per query tile, the log2-sum-exp2 of each row over its segment's keys.
Pass 2: per key tile, the column sums of exp2(s - lse) over the queries of its segment, divided by the segment
length. Given the rows' natural-log lse, pass 1 is skipped and pass 2 reads it (times log2(e)) with its own
strides. The host then sums the heads (float32 throughout; extra memory O(T * H)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .. import ops
from ._common import check_device, interpreting, next_pow2


@triton.jit
def _segments(t, cu_ptr, n_bounds, length, total, VARLEN: tl.constexpr):
    """[start, end) of the segment of each row t (0 <= t < total)."""
    if VARLEN:
        start = tl.zeros_like(t)
        end = tl.zeros_like(t) + total
        for i in range(0, n_bounds):
            bound = tl.load(cu_ptr + i)
            start = tl.where(bound <= t, tl.maximum(start, bound), start)
            end = tl.where(bound > t, tl.minimum(end, bound), end)
    else:
        start = (t // length) * length
        end = start + length
    return start, end


@triton.jit
def _row_offsets(t, length, s_b, s_l, VARLEN: tl.constexpr):
    t = t.to(tl.int64)
    if VARLEN:
        return t * s_l
    else:
        return (t // length) * s_b + (t % length) * s_l


@triton.jit
def _load_rows(ptr, t, mask, dims, n_dims, length, s_b, s_l, s_d, VARLEN: tl.constexpr, UPCAST: tl.constexpr):
    offs = _row_offsets(t, length, s_b, s_l, VARLEN)
    ptrs = ptr + offs[:, None] + (dims.to(tl.int64) * s_d)[None, :]
    x = tl.load(ptrs, mask=mask[:, None] & (dims < n_dims)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, cu_ptr, n_bounds, total, length, heads, n_dims, scale_log2,
                    q_sb, q_sh, q_sl, q_sd, k_sb, k_sh, k_sl, k_sd, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < total
    dims = tl.arange(0, BLOCK_D)
    start, end = _segments(rows, cu_ptr, n_bounds, length, total, VARLEN)
    first = tl.min(tl.where(row_mask, start, total), axis=0)
    last = tl.max(tl.where(row_mask, end, 0), axis=0)
    q = _load_rows(q_ptr + h * q_sh, rows, row_mask, dims, n_dims, length, q_sb, q_sl, q_sd, VARLEN, UPCAST)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(first, last, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr + h * k_sh, cols, cols < last, dims, n_dims, length, k_sb, k_sl, k_sd, VARLEN, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        inside = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid -inf - -inf
        l = l * tl.exp2(m - base) + tl.sum(tl.exp2(s - base[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows.to(tl.int64) * heads + h, m + tl.log2(tl.where(row_mask, l, 1.0)), mask=row_mask)


@triton.jit
def _column_sums_kernel(q_ptr, k_ptr, lse_ptr, colsum_ptr, cu_ptr, n_bounds, total, length, heads, n_dims,
                        scale_log2, lse_to_log2, q_sb, q_sh, q_sl, q_sd, k_sb, k_sh, k_sl, k_sd, lse_sb, lse_sh, lse_sl,
                        VARLEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < total
    dims = tl.arange(0, BLOCK_D)
    start, end = _segments(cols, cu_ptr, n_bounds, length, total, VARLEN)
    first = tl.min(tl.where(col_mask, start, total), axis=0)
    last = tl.max(tl.where(col_mask, end, 0), axis=0)
    k = _load_rows(k_ptr + h * k_sh, cols, col_mask, dims, n_dims, length, k_sb, k_sl, k_sd, VARLEN, UPCAST)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for q0 in range(first, last, BLOCK_M):
        rows = q0 + tl.arange(0, BLOCK_M)
        row_mask = rows < last
        q = _load_rows(q_ptr + h * q_sh, rows, row_mask, dims, n_dims, length, q_sb, q_sl, q_sd, VARLEN, UPCAST)
        lse_offs = _row_offsets(rows, length, lse_sb, lse_sl, VARLEN) + h * lse_sh
        lse = tl.load(lse_ptr + lse_offs, mask=row_mask, other=0.0) * lse_to_log2
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        # A query sees a key exactly when it lies in the key's segment.
        inside = row_mask[:, None] & (rows[:, None] >= start[None, :]) & (rows[:, None] < end[None, :])
        acc += tl.sum(tl.exp2(tl.where(inside, s - lse[:, None], float("-inf"))), axis=0)
    count = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(colsum_ptr + cols.to(tl.int64) * heads + h, acc / count, mask=col_mask)


def launch_qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
                     cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    v.check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse)
    check_device(q, "q")
    varlen = cu_seqlens is not None
    if varlen:
        total, heads, n_dims = q.shape
        length = 1  # unused
        q_sb, q_sl, q_sh, q_sd = 0, q.stride(0), q.stride(1), q.stride(2)
        k_sb, k_sl, k_sh, k_sd = 0, k.stride(0), k.stride(1), k.stride(2)
        n_bounds = cu_seqlens.shape[0]
        cu = cu_seqlens
    else:
        batch, heads, length, n_dims = q.shape
        total = batch * length
        q_sb, q_sh, q_sl, q_sd = q.stride()
        k_sb, k_sh, k_sl, k_sd = k.stride()
        n_bounds = 0
        cu = q  # any pointer: never read
    if lse is not None:  # natural log, (B, H, L) or packed (H, T)
        row_lse, lse_to_log2 = lse, math.log2(math.e)
        lse_sb, lse_sh, lse_sl = (0, *lse.stride()) if varlen else lse.stride()
    else:  # computed below in base 2, (T, H)
        row_lse, lse_to_log2 = torch.empty((max(total, 1), heads), dtype=torch.float32, device=q.device), 1.0
        lse_sb, lse_sh, lse_sl = length * heads, 1, heads
    colsum = torch.empty((total, heads), dtype=torch.float32, device=q.device)
    if total > 0:
        block = 16 if interpreting() else 64
        block_d = next_pow2(n_dims)
        # The interpreter's bf16 tl.dot is wrong (Triton 3.8): there the tiles go through float32.
        upcast = interpreting() and q.dtype == torch.bfloat16
        precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
        common = dict(VARLEN=varlen, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision,
                      UPCAST=upcast)
        strides = (q_sb, q_sh, q_sl, q_sd, k_sb, k_sh, k_sl, k_sd)
        scale_log2 = scale * math.log2(math.e)
        grid = (triton.cdiv(total, block), heads)
        if lse is None:
            torch.library.wrap_triton(_row_lse_kernel)[grid](
                q, k, row_lse, cu, n_bounds, total, length, heads, n_dims, scale_log2, *strides, **common)
        torch.library.wrap_triton(_column_sums_kernel)[grid](
            q, k, row_lse, colsum, cu, n_bounds, total, length, heads, n_dims, scale_log2, lse_to_log2, *strides,
            lse_sb, lse_sh, lse_sl, **common)
    scores = colsum.sum(dim=1) / heads
    if varlen:
        return scores
    return scores.view(batch, length)[:, num_prefix:].contiguous()


@torch.library.triton_op("hiprune_triton::qk_scores", mutates_args=())
def qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
              cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attention_scores(softmax(q @ k^T * scale), num_prefix) without the (L, L) map; packed with cu_seqlens;
    one pass instead of two with the rows' lse."""
    return launch_qk_scores(q, k, scale, num_prefix, cu_seqlens, lse)


# Shapes only, the same fake as torch.ops.hiprune.qk_scores (the interpreter cannot trace the op itself).
qk_scores.register_fake(ops.qk_scores_fake)
