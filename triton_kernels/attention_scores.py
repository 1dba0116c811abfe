"""hiprune_triton::attention_scores: column means of (B, H, L, L) maps, any strides, fp32/fp16/bf16.

Each program sums a block of columns over a slice of the H * L (head, query row) pairs in float64; with several
slices a second kernel adds the float64 partials in a fixed order. The mean is divided in float64 and rounded
once to float32, as every backend does, so the scores (and every index chosen from them) agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .. import ops
from ._common import check_device, interpreting


@triton.jit
def _column_sums_kernel(attn_ptr, out_ptr, partial_ptr, heads, length, n, num_prefix, s_b, s_h, s_q, s_k,
                        rows_per_split, n_splits, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        FINAL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    col_mask = cols < n
    col_offset = (num_prefix + cols).to(tl.int64) * s_k
    total_rows = heads * length
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, total_rows)
    acc = tl.zeros([BLOCK_N], tl.float64)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        h = (rows // length).to(tl.int64)
        q = (rows % length).to(tl.int64)
        ptrs = attn_ptr + b * s_b + (h * s_h + q * s_q)[:, None] + col_offset[None, :]
        x = tl.load(ptrs, mask=(rows < last)[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32).to(tl.float64), axis=0)
    if FINAL:
        count = tl.zeros([], tl.float64) + total_rows  # float64 even when Triton specialises a 1 to a constant
        tl.store(out_ptr + b * n + cols, (acc / count).to(tl.float32), mask=col_mask)
    else:
        tl.store(partial_ptr + (b * n_splits + split) * n + cols, acc, mask=col_mask)


@triton.jit
def _finish_kernel(partial_ptr, out_ptr, n, n_splits, count, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    acc = tl.zeros([BLOCK_N], tl.float64)
    for split in range(0, n_splits):  # fixed order: deterministic
        acc += tl.load(partial_ptr + (b * n_splits + split) * n + cols, mask=col_mask, other=0.0)
    tl.store(out_ptr + b * n + cols, (acc / (tl.zeros([], tl.float64) + count)).to(tl.float32), mask=col_mask)


def launch_attention_scores(attn: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    n = v.check_attention_map(attn, num_prefix, "attn")
    check_device(attn, "attn")
    batch, heads, length = attn.shape[0], attn.shape[1], attn.shape[2]
    out = torch.empty((batch, n), dtype=torch.float32, device=attn.device)
    if batch == 0:
        return out
    total_rows = heads * length
    if interpreting():
        block_r, block_n, n_splits = 64, 128, 1  # few, large blocks: the interpreter pays per operation
    else:
        block_r, block_n = 32, 128
        # Split the rows so that small batches still fill the GPU (~4 programs per SM on an H100).
        col_blocks = triton.cdiv(n, block_n)
        n_splits = max(1, min(triton.cdiv(total_rows, 4 * block_r), triton.cdiv(528, batch * col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(total_rows, n_splits), block_r) * block_r
    n_splits = triton.cdiv(total_rows, rows_per_split)
    grid = (batch, triton.cdiv(n, block_n), n_splits)
    s_b, s_h, s_q, s_k = attn.stride()
    if n_splits == 1:
        torch.library.wrap_triton(_column_sums_kernel)[grid](
            attn, out, out, heads, length, n, num_prefix, s_b, s_h, s_q, s_k, rows_per_split, 1,
            BLOCK_R=block_r, BLOCK_N=block_n, FINAL=True)
        return out
    partial = torch.empty((batch, n_splits, n), dtype=torch.float64, device=attn.device)
    torch.library.wrap_triton(_column_sums_kernel)[grid](
        attn, out, partial, heads, length, n, num_prefix, s_b, s_h, s_q, s_k, rows_per_split, n_splits,
        BLOCK_R=block_r, BLOCK_N=block_n, FINAL=False)
    torch.library.wrap_triton(_finish_kernel)[(batch, triton.cdiv(n, block_n))](
        partial, out, n, n_splits, total_rows, BLOCK_N=block_n)
    return out


@torch.library.triton_op("hiprune_triton::attention_scores", mutates_args=())
def attention_scores(attn: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """scores[b, j] = mean over heads and all query rows of attn[b, h, q, num_prefix + j], float32 (B, N)."""
    return launch_attention_scores(attn, num_prefix)


# Shapes only, the same fake as torch.ops.hiprune.attention_scores (the interpreter cannot trace the op itself).
attention_scores.register_fake(ops.attention_scores_fake)
