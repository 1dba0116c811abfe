"""hiprune_triton::prompt_select (HiPrune++): three launches, as csrc/cuda/prompt_select.cu.

- _mark_kept_kernel (one program per image): each token's slot in the kept list, or -1;
- _cosine_kernel (one program per image and block of tokens): float64 sums over the channels for the tokens not
  kept (kept rows are masked out of the loads), the quotient rounded once to float32;
- _merge_kernel (one program per image): the extra-th largest rank key among the tokens not kept, by the radix
  select of the fused selection kernel (_selection.py, kept tokens excluded through the slot row), then the kept
  and the added tokens compacted in index order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .. import ops
from ._common import check_device, interpreting, next_pow2
from . import _selection
from ._selection import _keys_at, _kth_largest_key

PROMPT = tl.constexpr(3)  # the role of an added token (a constexpr: read inside the kernels)


@triton.jit
def _mark_kept_kernel(indices_ptr, slots_ptr, n, kept, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slot_row = slots_ptr + b * n
    lanes = tl.arange(0, CHUNK)
    for c0 in range(0, n, CHUNK):
        offs = c0 + lanes
        tl.store(slot_row + offs, tl.full([CHUNK], -1, tl.int32), mask=offs < n)
    tl.debug_barrier()  # every slot cleared before any is set
    for c0 in range(0, kept, CHUNK):
        j = c0 + lanes
        token = tl.load(indices_ptr + b * kept + j, mask=j < kept, other=-1)
        valid = (j < kept) & (token >= 0) & (token < n)  # values are trusted, but never indexed out of bounds
        tl.store(slot_row + token, j.to(tl.int32), mask=valid)


@triton.jit
def _cosine_kernel(f_ptr, f_sb, f_sn, f_sc, p_ptr, p_sb, p_sc, slots_ptr, out_ptr, n, channels,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = tokens < n
    slot = tl.load(slots_ptr + b * n + tokens, mask=in_range, other=0)
    todo = in_range & (slot < 0)
    rows = f_ptr + b * f_sb + tokens.to(tl.int64) * f_sn
    dot = tl.zeros([BLOCK_N], tl.float64)
    ff = tl.zeros([BLOCK_N], tl.float64)
    pp = tl.zeros([BLOCK_C], tl.float64)
    for c0 in range(0, channels, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        chan_mask = chans < channels
        p = tl.load(p_ptr + b * p_sb + chans.to(tl.int64) * p_sc, mask=chan_mask, other=0.0)
        p = p.to(tl.float32).to(tl.float64)
        x = tl.load(rows[:, None] + (chans.to(tl.int64) * f_sc)[None, :], mask=todo[:, None] & chan_mask[None, :],
                    other=0.0).to(tl.float32).to(tl.float64)
        # Products of float32 values are exact in float64: only the sums round.
        dot += tl.sum(x * p[None, :], axis=1)
        ff += tl.sum(x * x, axis=1)
        pp += p * p
    # float64 square root and division round correctly (IEEE), then one rounding to float32. Rows not computed
    # get a unit denominator, so that only real zero vectors divide 0 by 0 (NaN).
    norms = tl.where(todo, ff, 1.0) * tl.sum(pp, axis=0)
    cosine = (dot / tl.sqrt(norms)).to(tl.float32)
    tl.store(out_ptr + b * n + tokens, cosine, mask=todo)


@triton.jit
def _merge_kernel(cos_ptr, slots_ptr, roles_ptr, out_indices_ptr, out_roles_ptr, n, kept, extra,
                  CHUNK: tl.constexpr, SINGLE: tl.constexpr, PAIRWISE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + b * n
    slot_row = slots_ptr + b * n
    out_len = kept + extra
    lanes = tl.arange(0, CHUNK)
    threshold = tl.full([], 9223372036854775807, tl.int64)  # above every key: nothing added
    if extra > 0:
        threshold = _kth_largest_key(cos_row, 1, slot_row, n, extra, True, CHUNK, SINGLE, PAIRWISE)
    written = tl.zeros([], tl.int32)
    for c0 in range(0, n, CHUNK):
        offs = c0 + lanes
        mask = offs < n
        slot = tl.load(slot_row + offs, mask=mask, other=-1)
        is_kept = mask & (slot >= 0)
        key = _keys_at(cos_row, 1, slot_row, offs, n, True)  # kept tokens: the excluded key
        chosen = is_kept | (mask & (slot < 0) & (key >= threshold))
        position = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        out = chosen & (position < out_len)
        role = tl.load(roles_ptr + b * kept + slot, mask=is_kept, other=PROMPT)
        tl.store(out_indices_ptr + b * out_len + position, offs.to(tl.int64), mask=out)
        tl.store(out_roles_ptr + b * out_len + position, tl.where(is_kept, role, PROMPT).to(tl.int8), mask=out)
        written += tl.sum(chosen.to(tl.int32), axis=0)


@torch.library.triton_op("hiprune_triton::prompt_select", mutates_args=())
def prompt_select(features: torch.Tensor, prompt: torch.Tensor, indices: torch.Tensor, roles: torch.Tensor,
                  extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """select's (indices, roles) plus the `extra` tokens not kept with the highest cosine similarity of their
    features to the prompt, (B, kept + extra) in increasing index order; added tokens have role 3."""
    args = v.check_prompt_args(features, prompt, indices, roles, extra)
    v.check_prompt_index_values(indices, args.n)
    check_device(features, "features")
    device = features.device
    out_len = args.kept + extra
    out_indices = torch.empty((args.batch, out_len), dtype=torch.int64, device=device)
    out_roles = torch.empty((args.batch, out_len), dtype=torch.int8, device=device)
    if args.batch == 0 or out_len == 0:
        return out_indices, out_roles
    n = args.n
    kept_indices, kept_roles = indices.contiguous(), roles.contiguous()
    slots = torch.empty((args.batch, n), dtype=torch.int32, device=device)
    cosines = torch.empty((args.batch, n), dtype=torch.float32, device=device)
    torch.library.wrap_triton(_mark_kept_kernel)[(args.batch,)](kept_indices, slots, n, args.kept, CHUNK=256)
    if extra > 0:
        block_n, block_c = (16, 32) if interpreting() else (16, 128)
        torch.library.wrap_triton(_cosine_kernel)[(args.batch, triton.cdiv(n, block_n))](
            features, features.stride(0), features.stride(1), features.stride(2), prompt, prompt.stride(0),
            prompt.stride(1), slots, cosines, n, args.channels, BLOCK_N=block_n, BLOCK_C=block_c)
    # The sizes of the selection kernel, read at call time (tests shrink them to reach the streaming path).
    single = n <= _selection.SORT_MAX_N
    chunk = next_pow2(n) if single else next_pow2(_selection.RADIX_CHUNK)
    torch.library.wrap_triton(_merge_kernel)[(args.batch,)](
        cosines, slots, kept_roles, out_indices, out_roles, n, args.kept, extra, CHUNK=chunk, SINGLE=single,
        PAIRWISE=single and chunk <= _selection.PAIRWISE_MAX_N, num_warps=4 if chunk <= 1024 else 8)
    return out_indices, out_roles


# Shapes only, the same fake as torch.ops.hiprune.prompt_select (the interpreter cannot trace the op itself).
prompt_select.register_fake(ops.prompt_select_fake)
