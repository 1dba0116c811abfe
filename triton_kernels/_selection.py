"""The fused HiPrune selection kernel shared by select, select_with_roles and prune: one program per image.

It follows csrc/cpu/select_with_roles.cpp, reshaped for a GPU program:
- thresholds: the k-th largest rank key, by a radix select (4 bits a pass, 16 candidate thresholds counted at
  once). Up to SORT_MAX_N tokens the keys sit in registers; above, every pass streams them from global memory in
  chunks of RADIX_CHUNK, so any N works. (tl.sort would do for the small case, but it is some 20 times slower
  in Triton's interpreter, where the tests run.) Tiny grids (up to PAIRWISE_MAX_N) rank all pairs at once.
- buffers are gathered, not scattered: a token is a buffer when it is no anchor and an anchor lies in its
  neighbourhood (the neighbourhoods are symmetric). Official mode inverts the clamped flat steps: an inner token j
  is hit from j - d exactly; token 0 from every anchor in [1, grid_w], token N-1 from every one in
  [N-1-grid_w, N-2].
- the roles of the kept tokens go through a (B, N) int8 scratch row, then registers and a sorted compaction
  (running tl.cumsum over chunks) write the output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _validation as v
from ._common import check_device, excluded_key, join_key, key_high, key_low, next_pow2, rank_key
from .attention_scores import launch_attention_scores

# Up to this many tokens the keys of an image stay in registers; above, they are streamed in chunks.
# Tests monkeypatch both small to exercise the streaming path on small grids.
SORT_MAX_N = 4096
RADIX_CHUNK = 1024
# Up to this many tokens (padded), a (N, N) comparison ranks the keys in one step instead of the radix passes.
PAIRWISE_MAX_N = 64

_INT64_MAX = 9223372036854775807


@triton.jit
def _keys_at(score_row, score_stride, role_row, offs, n, EXCLUDE_KEPT: tl.constexpr):
    """Rank keys of tokens offs (excluded key outside [0, n) and, if EXCLUDE_KEPT, for kept tokens)."""
    mask = offs < n
    s = tl.load(score_row + offs.to(tl.int64) * score_stride, mask=mask, other=0.0).to(tl.float32)
    key = rank_key(s, offs)
    if EXCLUDE_KEPT:
        role = tl.load(role_row + offs, mask=mask, other=-1)
        key = tl.where(role >= 0, excluded_key(), key)
    return tl.where(mask, key, excluded_key())


@triton.jit
def _digit_counts(values, valid, base, SHIFT: tl.constexpr):
    """For d in 0..15: how many valid values are >= base + d << SHIFT."""
    cands = base + (tl.arange(0, 16).to(tl.int64) << SHIFT)
    hit = valid[None, :] & (values[None, :] >= cands[:, None])
    return tl.sum(hit.to(tl.int32), axis=1)


@triton.jit
def _next_digit(base, counts, k, SHIFT: tl.constexpr):
    """Extends base by the largest digit whose candidate still has >= k values at or above it."""
    digits = tl.arange(0, 16).to(tl.int64)
    return base + (tl.max(tl.where(counts >= k, digits, 0), axis=0) << SHIFT)


@triton.jit
def _kth_largest_key(score_row, score_stride, role_row, n, k, EXCLUDE_KEPT: tl.constexpr, CHUNK: tl.constexpr,
                     SINGLE: tl.constexpr, PAIRWISE: tl.constexpr):
    """The k-th largest rank key (1 <= k <= number of keys that are not excluded), by radix select: first the
    high 32 bits (the score) 4 bits at a time, then, only when equal scores straddle the cut, the low 32 bits
    (the index) among the tied keys. SINGLE: all keys fit one chunk and stay in registers. PAIRWISE: tiny N,
    ranked by one all-pairs comparison."""
    lanes = tl.arange(0, CHUNK)
    if PAIRWISE:
        # Tiny N: the key with exactly k - 1 keys above it (keys are unique but for the excluded ones, and those
        # have at least k keys above them).
        keys = _keys_at(score_row, score_stride, role_row, lanes, n, EXCLUDE_KEPT)
        above_each = tl.sum((keys[None, :] > keys[:, None]).to(tl.int32), axis=1)
        result = tl.sum(tl.where(above_each == k - 1, keys, 0), axis=0)
    else:  # compiled Triton takes no early return out of a branch
        if SINGLE:
            keys = _keys_at(score_row, score_stride, role_row, lanes, n, EXCLUDE_KEPT)
            high = key_high(keys)
            everywhere = lanes >= 0
            high_t = tl.zeros([], tl.int64)
            for step in tl.static_range(8):
                counts = _digit_counts(high, everywhere, high_t, 28 - 4 * step)
                high_t = _next_digit(high_t, counts, k, 28 - 4 * step)
            tied = high == high_t
            above = tl.sum((high > high_t).to(tl.int32), axis=0)
            n_tied = tl.sum(tied.to(tl.int32), axis=0)
            low = key_low(keys)
            if above + n_tied == k:  # every tied key is taken: the cut is the smallest of them
                low_t = tl.min(tl.where(tied, low, 0xFFFFFFFF), axis=0)
            else:
                low_t = tl.zeros([], tl.int64)
                for step in tl.static_range(8):
                    low_t = _next_digit(low_t, _digit_counts(low, tied, low_t, 28 - 4 * step), k - above,
                                        28 - 4 * step)
        else:
            high_t = tl.zeros([], tl.int64)
            for step in tl.static_range(8):
                counts = tl.zeros([16], tl.int32)
                for c0 in range(0, n, CHUNK):
                    high = key_high(_keys_at(score_row, score_stride, role_row, c0 + lanes, n, EXCLUDE_KEPT))
                    counts += _digit_counts(high, high >= 0, high_t, 28 - 4 * step)
                high_t = _next_digit(high_t, counts, k, 28 - 4 * step)
            above = tl.zeros([], tl.int32)
            n_tied = tl.zeros([], tl.int32)
            low_min = tl.full([], 0xFFFFFFFF, tl.int64)
            for c0 in range(0, n, CHUNK):
                key = _keys_at(score_row, score_stride, role_row, c0 + lanes, n, EXCLUDE_KEPT)
                tied = key_high(key) == high_t
                above += tl.sum((key_high(key) > high_t).to(tl.int32), axis=0)
                n_tied += tl.sum(tied.to(tl.int32), axis=0)
                low_min = tl.minimum(low_min, tl.min(tl.where(tied, key_low(key), 0xFFFFFFFF), axis=0))
            if above + n_tied == k:
                low_t = low_min
            else:
                low_t = tl.zeros([], tl.int64)
                for step in tl.static_range(8):
                    counts = tl.zeros([16], tl.int32)
                    for c0 in range(0, n, CHUNK):
                        key = _keys_at(score_row, score_stride, role_row, c0 + lanes, n, EXCLUDE_KEPT)
                        counts += _digit_counts(key_low(key), key_high(key) == high_t, low_t, 28 - 4 * step)
                    low_t = _next_digit(low_t, counts, k - above, 28 - 4 * step)
        result = join_key(high_t, low_t)
    return result


@triton.jit
def _anchor_at(obj_row, obj_stride, idx, valid, anchor_t):
    """Whether token idx (where valid) is an anchor: its object key reaches the anchor threshold."""
    s = tl.load(obj_row + idx.to(tl.int64) * obj_stride, mask=valid, other=0.0).to(tl.float32)
    return valid & (rank_key(s, idx) >= anchor_t)


@triton.jit
def _grid_neighbor_anchor(obj_row, obj_stride, row, col, mask, grid_h, grid_w, anchor_t, DR: tl.constexpr,
                          DC: tl.constexpr):
    r = row + DR
    c = col + DC
    on_grid = mask & (r >= 0) & (r < grid_h) & (c >= 0) & (c < grid_w)
    return _anchor_at(obj_row, obj_stride, r * grid_w + c, on_grid, anchor_t)


@triton.jit
def _any_anchor_in(obj_row, obj_stride, first, last, n, anchor_t, CHUNK: tl.constexpr):
    """1 if a token in [first, last] (clipped to [0, n)) is an anchor, else 0 (int32 scalar)."""
    found = tl.zeros([], tl.int32)
    for c0 in range(first, last + 1, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        hit = _anchor_at(obj_row, obj_stride, idx, (idx >= 0) & (idx <= last) & (idx < n), anchor_t)
        found = tl.maximum(found, tl.max(hit.to(tl.int32), axis=0))
    return found


@triton.jit
def _select_kernel(obj_ptr, obj_sb, obj_sn, deep_ptr, deep_sb, deep_sn, role_scratch_ptr, indices_ptr, roles_ptr,
                   kept_ptr, n, budget, grid_h, grid_w, n_anchor, SQUARE: tl.constexpr, OFFICIAL: tl.constexpr,
                   WRITE_ROLES: tl.constexpr, CHUNK: tl.constexpr, SINGLE: tl.constexpr,
                   PAIRWISE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    obj_row = obj_ptr + b * obj_sb
    deep_row = deep_ptr + b * deep_sb
    role_row = role_scratch_ptr + b * n
    lanes = tl.arange(0, CHUNK)

    # Anchors: object key >= the n_anchor-th largest object key. No anchors: a threshold no key reaches.
    anchor_t = tl.full([], 9223372036854775807, tl.int64)
    if n_anchor > 0:
        anchor_t = _kth_largest_key(obj_row, obj_sn, role_row, n, n_anchor, False, CHUNK, SINGLE, PAIRWISE)

    if OFFICIAL:
        # Clamping piles the out-of-range steps onto tokens 0 and N-1.
        front_hit = _any_anchor_in(obj_row, obj_sn, 1, grid_w, n, anchor_t, CHUNK)
        back_hit = _any_anchor_in(obj_row, obj_sn, n - 1 - grid_w, n - 2, n, anchor_t, CHUNK)

    # Anchors and buffers into the scratch row; count them.
    n_kept = tl.zeros([], tl.int32)
    for c0 in range(0, n, CHUNK):
        offs = c0 + lanes
        mask = offs < n
        anchor = _anchor_at(obj_row, obj_sn, offs, mask, anchor_t)
        if OFFICIAL:
            near = _anchor_at(obj_row, obj_sn, offs + 1, mask & (offs + 1 < n), anchor_t)
            near |= _anchor_at(obj_row, obj_sn, offs - 1, mask & (offs >= 1), anchor_t)
            near |= _anchor_at(obj_row, obj_sn, offs + grid_w, mask & (offs + grid_w < n), anchor_t)
            near |= _anchor_at(obj_row, obj_sn, offs - grid_w, mask & (offs >= grid_w), anchor_t)
            near |= (offs == 0) & (front_hit > 0)
            near |= (offs == n - 1) & (back_hit > 0)
        else:
            row = offs // grid_w
            col = offs % grid_w
            near = _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, -1, 0)
            near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, 1, 0)
            near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, 0, -1)
            near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, 0, 1)
            if SQUARE:
                near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, -1, -1)
                near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, -1, 1)
                near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, 1, -1)
                near |= _grid_neighbor_anchor(obj_row, obj_sn, row, col, mask, grid_h, grid_w, anchor_t, 1, 1)
        role = tl.where(anchor, 0, tl.where(near, 1, -1))
        tl.store(role_row + offs, role.to(tl.int8), mask=mask)
        n_kept += tl.sum((mask & (role >= 0)).to(tl.int32), axis=0)
    tl.store(kept_ptr + b, n_kept)
    tl.debug_barrier()  # the scratch row is read back by other threads of this program

    # Registers: not kept and deep key >= the n_reg-th largest deep key among the tokens not kept.
    n_reg = budget - n_kept
    register_t = tl.full([], 9223372036854775807, tl.int64)
    if n_reg > 0:
        register_t = _kth_largest_key(deep_row, deep_sn, role_row, n, n_reg, True, CHUNK, SINGLE, PAIRWISE)

    # Sorted compaction: the selected tokens in increasing index order, roles aligned.
    written = tl.zeros([], tl.int32)
    for c0 in range(0, n, CHUNK):
        offs = c0 + lanes
        mask = offs < n
        key = _keys_at(deep_row, deep_sn, role_row, offs, n, True)
        role = tl.load(role_row + offs, mask=mask, other=-1).to(tl.int32)
        role = tl.where((role < 0) & (key >= register_t), 2, role)
        chosen = mask & (role >= 0)
        slot = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        out = chosen & (slot < budget)  # overflow (official mode) is reported by the host, never written past
        tl.store(indices_ptr + b * budget + slot, offs.to(tl.int64), mask=out)
        if WRITE_ROLES:
            tl.store(roles_ptr + b * budget + slot, role.to(tl.int8), mask=out)
        written += tl.sum(chosen.to(tl.int32), axis=0)


def _scores_of(t: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Maps are reduced by the attention_scores kernel; (B, N) scores are read in place, converted on load."""
    return launch_attention_scores(t, num_prefix) if t.dim() == 4 else t


def launch_select(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
                  alpha: float, num_prefix: int, neighborhood: str, official: bool,
                  with_roles: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validates, selects, and raises the official overflow error. Returns (indices, roles or None)."""
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    check_device(object_attn, "object_attn")
    device = object_attn.device
    indices = torch.empty((args.batch, budget), dtype=torch.int64, device=device)
    roles = torch.empty((args.batch, budget), dtype=torch.int8, device=device) if with_roles else None
    if args.batch == 0:
        return indices, roles
    object_scores = _scores_of(object_attn, num_prefix)
    deep_scores = _scores_of(deep_attn, num_prefix)
    role_scratch = torch.empty((args.batch, args.n), dtype=torch.int8, device=device)
    kept = torch.empty((args.batch,), dtype=torch.int32, device=device)
    single = args.n <= SORT_MAX_N
    chunk = next_pow2(args.n) if single else next_pow2(RADIX_CHUNK)
    torch.library.wrap_triton(_select_kernel)[(args.batch,)](
        object_scores, object_scores.stride(0), object_scores.stride(1), deep_scores, deep_scores.stride(0),
        deep_scores.stride(1), role_scratch, indices, roles if with_roles else indices, kept, args.n, budget,
        grid_h, grid_w, args.n_anchor, SQUARE=neighborhood == "square", OFFICIAL=official, WRITE_ROLES=with_roles,
        CHUNK=chunk, SINGLE=single, PAIRWISE=single and chunk <= PAIRWISE_MAX_N,
        num_warps=4 if chunk <= 1024 else 8)
    # Overflow needs more than budget anchors and buffers, impossible unless 5 * n_anchor > budget: only then
    # does the host read the counts (the one sync the brief allows).
    if official and 5 * args.n_anchor > budget:
        most = int(kept.max())
        if most > budget:
            raise ValueError(v.official_overflow_message(most, budget))
    return indices, roles
