"""Pure-torch HiPrune, written straight from the contract (docs/ops.md).

It is the truth for the tests, the baseline of the benchmarks and the fallback when the extension is missing.
Everything is vectorised over the batch. It favours plain statements of the rules over speed.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validation as v

ANCHOR, BUFFER, REGISTER = 0, 1, 2
PROMPT = 3  # a token HiPrune++ adds because it matches the prompt (prompt_select)

# Neighbour offsets (row, col): up, down, left, right, then the diagonals of "square".
_OFFSETS = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]


def attention_scores(attn: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """Mean over heads and all query rows of each patch column; summed in float64, rounded once to float32."""
    v.check_attention_map(attn, num_prefix, "attn")
    heads, length = attn.shape[1], attn.shape[2]
    total = attn[..., num_prefix:].sum(dim=(1, 2), dtype=torch.float64)
    return (total / (heads * length)).to(torch.float32)


def qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
              cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attention_scores(softmax(q @ k^T * scale)), computed densely in float64 (the truth, not memory-lean).

    With lse (each row's log-sum-exp, (B, H, L) or packed (H, T)), the probabilities are exp(logits - lse).
    """
    v.check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse)
    if cu_seqlens is None:
        logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
        if lse is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            probs = torch.exp(logits - lse.double().unsqueeze(-1))
        return (probs[..., num_prefix:].sum(dim=(1, 2)) / (q.shape[1] * q.shape[2])).to(torch.float32)
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg_q = q[start:end].transpose(0, 1).unsqueeze(0)
            seg_k = k[start:end].transpose(0, 1).unsqueeze(0)
            seg_lse = None if lse is None else lse[:, start:end].unsqueeze(0)
            out[start:end] = qk_scores(seg_q, seg_k, scale, 0, None, seg_lse)[0]
    return out


def _scores(t: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return attention_scores(t, num_prefix) if t.dim() == 4 else t.to(torch.float32)


def rank_positions(scores: torch.Tensor, excluded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Position of each token in the ranking (0 = best): higher score first, ties to the lower index, NaN below
    every number, excluded tokens below everything."""
    s = scores.to(torch.float32) + 0.0  # folds -0.0 into +0.0
    tier = torch.isnan(s).to(torch.int8)
    if excluded is not None:
        tier = torch.where(excluded, 2, tier).to(torch.int8)
    s = torch.where(tier > 0, float("-inf"), s)
    # Two stable sorts: by score, then by tier, so the tier decides first and the index breaks ties last.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(tier.gather(1, order), dim=1, stable=True).indices)
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return positions


def _buffer_mask(anchor: torch.Tensor, grid_h: int, grid_w: int, neighborhood: str, official: bool) -> torch.Tensor:
    """Tokens that are a neighbour of some anchor (anchor: (B, N) bool)."""
    batch, n = anchor.shape
    idx = torch.arange(n, device=anchor.device)
    row, col = idx // grid_w, idx % grid_w
    hits = torch.zeros(batch, n + 1, dtype=torch.bool, device=anchor.device)  # column n collects the off-grid
    slots = 4 if official else v.NEIGHBORHOODS[neighborhood] - 1
    for dr, dc in _OFFSETS[:slots]:
        if official:
            # The release steps on flattened indices and clamps, so it wraps across rows.
            target = (idx + dr * grid_w + dc).clamp(0, n - 1)
        else:
            r, c = row + dr, col + dc
            on_grid = (r >= 0) & (r < grid_h) & (c >= 0) & (c < grid_w)
            target = torch.where(on_grid, r * grid_w + c, n)
        target = torch.where(anchor, target, n)
        hits.scatter_(1, target, True)
    return hits[:, :n]


def select_with_roles(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
                      alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
                      official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    object_scores = _scores(object_attn, num_prefix)
    deep_scores = _scores(deep_attn, num_prefix)
    batch, n = object_scores.shape

    anchor = rank_positions(object_scores) < args.n_anchor
    kept = anchor | _buffer_mask(anchor, grid_h, grid_w, neighborhood, official)
    n_kept = kept.sum(dim=1, keepdim=True)
    if official and bool((n_kept > budget).any()):
        raise ValueError(v.official_overflow_message(int(n_kept.max()), budget))
    register = ~kept & (rank_positions(deep_scores, excluded=kept) < budget - n_kept)

    role = torch.full((batch, n), -1, dtype=torch.int8, device=object_scores.device)
    role[register] = REGISTER
    role[kept] = BUFFER
    role[anchor] = ANCHOR
    # Kept tokens first, each group in increasing index order.
    indices = torch.sort((role < 0).to(torch.int8), dim=1, stable=True).indices[:, :budget]
    return indices, role.gather(1, indices)


def select(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
           alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross", official: bool = False) -> torch.Tensor:
    return select_with_roles(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                             official)[0]


def prune(features: torch.Tensor, object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int,
          grid_w: int, alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
          official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    v.check_prune_features(features, args, object_attn)
    indices = select(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official)
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[2])), indices


def prompt_cosines(features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """(B, N, C) features, (B, C) prompt -> float32 (B, N) cosine similarities: float64 sums (the products of the
    inputs are exact there), the quotient rounded once. A zero vector on either side gives 0 / 0 = NaN."""
    f, p = features.double(), prompt.double()
    dot = torch.einsum("bnc,bc->bn", f, p)
    ff = torch.einsum("bnc,bnc->bn", f, f)
    pp = torch.einsum("bc,bc->b", p, p)
    return (dot / torch.sqrt(ff * pp[:, None])).to(torch.float32)


def prompt_select(features: torch.Tensor, prompt: torch.Tensor, indices: torch.Tensor, roles: torch.Tensor,
                  extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPrune++: the kept tokens plus the `extra` tokens not kept whose features are most similar to the prompt,
    (B, kept + extra) in increasing index order; roles are the kept tokens' own, PROMPT for the added ones."""
    args = v.check_prompt_args(features, prompt, indices, roles, extra)
    v.check_prompt_index_values(indices, args.n)
    batch, n = args.batch, args.n
    # Values outside [0, N) (unchecked off the CPU) land in a spare column n, never out of bounds.
    safe = torch.where((indices >= 0) & (indices < n), indices, n)
    kept = torch.zeros(batch, n + 1, dtype=torch.bool, device=features.device)
    kept.scatter_(1, safe, True)
    role = torch.full((batch, n + 1), -1, dtype=torch.int8, device=features.device)
    role.scatter_(1, safe, roles)
    kept, role = kept[:, :n], role[:, :n]
    added = torch.zeros_like(kept)
    if extra > 0:
        added = ~kept & (rank_positions(prompt_cosines(features, prompt), excluded=kept) < extra)
    role = torch.where(added, PROMPT, role).to(torch.int8)
    # Chosen tokens first, each in increasing index order.
    out = torch.sort((~(kept | added)).to(torch.int8), dim=1, stable=True).indices[:, :args.kept + extra]
    return out, role.gather(1, out)
