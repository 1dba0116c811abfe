"""Qwen2.5-VL geometry shared by the transformers and vLLM integrations (torch only, no framework import).

- merged_raster_scores: the tower scores patches in window order, four patches (one 2x2 merge unit) after another;
  the language model sees one token per merge unit, in raster order. Average each unit, then undo the window order.
- kept_grid_offsets: the (t, h, w) M-RoPE offsets, inside their image, of the kept merged tokens.
- mrope_positions: M-RoPE positions of a prompt whose images keep only some of their tokens. Kept tokens keep their
  original positions; text after an image keeps its original positions too (it continues after the FULL grid), so
  everything but the kept tokens' own offsets is known before the encoder runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def merged_raster_scores(scores: torch.Tensor, window_index: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """(T,) patch scores in window order -> (T // merge_unit,) merged-token scores in raster order.

    window_index[i] is the raster index of the merged token at window position i (what the tower gathers with).
    """
    if scores.dim() != 1 or scores.numel() % merge_unit:
        raise ValueError(f"scores must be 1-D with a multiple of merge_unit={merge_unit} entries, "
                         f"got shape {tuple(scores.shape)}")
    merged = scores.reshape(-1, merge_unit).mean(dim=1)
    if window_index.numel() != merged.numel():
        raise ValueError(f"window_index has {window_index.numel()} entries for {merged.numel()} merged tokens")
    raster = torch.empty_like(merged)
    raster[window_index.to(merged.device)] = merged
    return raster


def kept_grid_offsets(indices: torch.Tensor, grid_h: int, grid_w: int, t_scale: float = 1.0) -> torch.Tensor:
    """(k,) raster indices over a (t * grid_h) x grid_w merged grid -> (3, k) int64 (t, h, w) offsets."""
    indices = indices.to(torch.int64)
    plane = grid_h * grid_w
    t = indices // plane
    if t_scale != 1.0:
        t = (t.to(torch.float64) * t_scale).to(torch.int64)
    return torch.stack([t, (indices % plane) // grid_w, indices % grid_w])


@dataclass
class MediaItem:
    offset: int             # index of the item's first placeholder in the prompt
    grid_t: int             # merged grid (t, h, w) of the FULL item
    grid_h: int
    grid_w: int
    kept: int               # placeholders the item has in the prompt
    t_scale: float = 1.0    # video: seconds per grid step * tokens per second


def mrope_positions(num_tokens: int, items: Sequence[MediaItem],
                    kept_offsets: Optional[Sequence[Optional[torch.Tensor]]] = None) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) int64 M-RoPE positions and the decode delta (next position - num_tokens). items in prompt order.

    Item i's placeholders get position origin_i + kept_offsets[i] (3, kept); when kept_offsets[i] is None they get
    origin_i alone (all three rows), to be completed once the kept tokens are known. origin_i = the position the
    unpruned model gives the item's first token; the text after an item continues after its full grid.
    """
    positions = torch.empty(3, num_tokens, dtype=torch.int64)
    cursor, next_pos = 0, 0
    for i, item in enumerate(items):
        if item.offset < cursor or item.offset + item.kept > num_tokens:
            raise ValueError(f"media item at offset {item.offset} with {item.kept} tokens overlaps the previous "
                             f"item or the end of the {num_tokens}-token prompt (items go in prompt order)")
        text = item.offset - cursor
        positions[:, cursor:item.offset] = torch.arange(next_pos, next_pos + text)
        origin = next_pos + text
        span = slice(item.offset, item.offset + item.kept)
        offsets = kept_offsets[i] if kept_offsets is not None else None
        positions[:, span] = origin if offsets is None else origin + offsets.to(torch.int64)
        full_t = int((item.grid_t - 1) * item.t_scale)
        next_pos = origin + max(full_t, item.grid_h - 1, item.grid_w - 1) + 1
        cursor = item.offset + item.kept
    positions[:, cursor:] = torch.arange(next_pos, next_pos + num_tokens - cursor)
    last = next_pos + num_tokens - cursor  # the position the next token takes
    return positions, last - num_tokens
