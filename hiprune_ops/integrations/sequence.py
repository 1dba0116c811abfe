"""Shrinking the prompt: each image's (or video slice's) run of placeholder tokens becomes a run of its kept tokens.

Items of one kind (images, video slices) fill their placeholder tokens in row-major order over the batch (as
masked_scatter does in transformers), so item i owns the next full_counts[i] placeholders of its kind. Within its
run, the placeholders at kept_slots[i] stay. Rows that shrink by different amounts are re-padded (old padding dropped
first) on the side the batch was padded on (left when unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class ShrinkPlan:
    source: torch.Tensor       # (B, S') index into the original sequence of each new position (0 where padding)
    valid: torch.Tensor        # (B, S') bool: a real (non-added) position
    removed: torch.Tensor      # (B,) tokens removed from each row
    original_length: int

    def take(self, tensor: torch.Tensor, fill) -> torch.Tensor:
        """Gathers a (..., B, S) tensor along its last dim; added positions get `fill`."""
        index = self.source.expand(*tensor.shape[:-2], *self.source.shape)
        taken = tensor.gather(-1, index)
        return torch.where(self.valid, taken, torch.as_tensor(fill, dtype=tensor.dtype, device=tensor.device))


@dataclass
class Placeholders:
    """The placeholders of one kind: where they are, how many each item needs, which of them each item keeps."""
    mask: torch.Tensor                 # (B, S) bool
    full_counts: Sequence[int]
    kept_slots: Sequence[torch.Tensor]
    kind: str = "image"


def plan_shrink(input_ids: torch.Tensor, kinds: Sequence[Placeholders],
                attention_mask: Optional[torch.Tensor]) -> ShrinkPlan:
    device = input_ids.device
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    placeholders = torch.zeros_like(keep)
    for kind in kinds:
        total = int(kind.mask.sum())
        expected = int(sum(kind.full_counts))
        if total != expected:
            raise ValueError(f"hiprune: input_ids hold {total} {kind.kind} tokens but the {kind.kind}s need "
                             f"{expected}; pass the processor's output unchanged (one run of placeholders per "
                             f"{kind.kind})")
        keep_runs = []
        for count, slots in zip(kind.full_counts, kind.kept_slots):
            run = torch.zeros(count, dtype=torch.bool, device=device)
            run[slots.to(device)] = True
            keep_runs.append(run)
        if keep_runs:
            keep[kind.mask] = torch.cat(keep_runs)
        placeholders |= kind.mask
    if attention_mask is not None:
        keep &= attention_mask.bool()  # old padding goes too; rows are re-padded below
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    batch, length = input_ids.shape
    # Kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    rank = torch.arange(new_len, device=device).expand(batch, -1)
    left = attention_mask is None or bool((attention_mask[:, 0] == 0).any()) or not bool(
        (attention_mask[:, -1] == 0).any())
    if left:
        src_rank = rank - (new_len - lengths)[:, None]
        valid = src_rank >= 0
    else:
        src_rank = rank
        valid = rank < lengths[:, None]
    source = order.gather(1, src_rank.clamp(0, length - 1))
    source = torch.where(valid, source, 0)
    # `removed` counts placeholder tokens only (what the language model no longer sees), not dropped padding.
    dropped = placeholders & ~keep
    if attention_mask is not None:
        dropped &= attention_mask.bool()
    return ShrinkPlan(source, valid, dropped.sum(dim=1), length)
