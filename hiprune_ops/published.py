"""The authors' released HiPrune recipe, restated for comparison (written from its description, not its code):
the one restatement, used by tests/test_reference.py (against official=True) and the benchmarks (as a baseline).

What the release does, per batch of images:
1. the vision tower runs with eager attention and returns every layer's attention map;
2. received attention per layer: the map averaged over heads, then over query rows, in the map's dtype;
3. one Python iteration per image: top-k anchors by object score (k = round(budget * alpha / 5), no cap), their
   neighbours at flat offsets -1, +1, -grid_w, +grid_w clamped into [0, N - 1] (so they wrap across rows),
   duplicates removed; then the deep scores of those tokens are lowered by 1 (received attention is at most 1,
   so they fall below every other token) and the top (budget - kept) deep tokens become registers;
4. the result is a boolean mask over the N patches.
This is `official=True` of hiprune_ops.select; `mask_to_indices(...)` turns the mask into its indices.
"""

from __future__ import annotations

import torch

# Flat neighbour offsets of the release's cross neighbourhood, anchor itself first; grid_w fills in the rows.
_CROSS_ROW_STEPS = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))


def received_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, H, L, L) maps -> (B, L - num_prefix) scores, as the release reduces them (mean of means, map dtype)."""
    return attn.mean(dim=1).mean(dim=1)[:, num_prefix:]


def select_mask(object_scores: torch.Tensor, deep_scores: torch.Tensor, budget: int, grid_w: int,
                alpha: float = 0.1) -> torch.Tensor:
    """The release's per-image selection loop: (B, N) scores -> (B, N) bool mask with `budget` True per row."""
    batch, n = object_scores.shape
    device = object_scores.device
    n_anchor = round(budget * alpha / 5)  # Python's round: half to even, like the release
    steps = torch.tensor([dr * grid_w + dc for dr, dc in _CROSS_ROW_STEPS], device=device)
    rows = []
    for image in range(batch):
        anchors = torch.topk(object_scores[image], n_anchor).indices
        around = torch.unique((anchors[None, :] + steps[:, None]).clamp(0, n - 1))
        if around.numel() > budget:  # the release's topk fails here, on a negative count
            raise ValueError(f"the release keeps {around.numel()} anchors and buffers, more than budget {budget}")
        taken = torch.zeros(n, dtype=torch.bool, device=device)
        taken[around] = True
        lowered = deep_scores[image] - taken.to(deep_scores.dtype)
        registers = torch.topk(lowered, budget - around.numel()).indices
        keep = taken.clone()
        keep[registers] = True
        rows.append(keep)
    return torch.stack(rows)


def select_from_maps(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_w: int,
                     num_prefix: int = 1, alpha: float = 0.1) -> torch.Tensor:
    return select_mask(received_attention(object_attn, num_prefix), received_attention(deep_attn, num_prefix),
                       budget, grid_w, alpha)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask with the same count per row -> (B, count) increasing int64 indices."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)
