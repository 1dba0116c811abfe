"""HiPrune++'s prompt side, for every framework: which tokens of a prompt are its text, and which prompt row each
visual item belongs to.

The prompt text of a row (the rule, as one function): the tokens after the row's last visual token (its
placeholders; where a video's prompt interleaves text with its frames, as GLM-4V's timestamps, the whole video
through its end marker: `spans`), up to the first special token after them or the first end-of-turn token (eos)
after it, whichever comes first, leaving out padding (attention_mask 0) and special tokens. Special
tokens: the config's token ids (placeholders, image start / end markers, bos / eos / pad) and any the caller adds (a
tokenizer's all_special_ids); end-of-turn tokens: the config's and generation config's eos ids (Qwen's <|im_end|>,
Gemma's <end_of_turn>). So in a chat the text is the question of the turn that carries the latest image; template
words that are not special tokens ("ASSISTANT:" in LLaVA-1.5's plain template) count as text. A row with no such
token (an image followed by the end of its turn) has no text: its items get no extra tokens.
No framework import here.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

_ID_SUFFIXES = ("token_id", "token_ids", "token_index")


def config_token_ids(*configs, names: Optional[tuple[str, ...]] = None) -> set[int]:
    """Every int token id the configs name (`*_token_id`, `*_token_ids`, `*_token_index`, lists of them), or only
    those of the attributes `names`."""
    ids: set[int] = set()
    for config in configs:
        if config is None:
            continue
        values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        for name, value in values.items():
            if not (name in names if names is not None else name.endswith(_ID_SUFFIXES)):
                continue
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                    ids.add(item)
    return ids


def _first(where: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, 1): each row's first position where `where` holds, else the row length."""
    return torch.where(where, positions, positions.shape[1]).amin(1, keepdim=True)


def text_mask(input_ids: torch.Tensor, visual: torch.Tensor, special_ids: Iterable[int],
              attention_mask: Optional[torch.Tensor] = None, end_ids: Iterable[int] = ()) -> torch.Tensor:
    """(B, L) bool: each row's prompt text by the module's rule. visual: (B, L) bool, the visual tokens;
    end_ids: the end-of-turn ids (special too)."""
    def among(ids):
        return torch.isin(input_ids, torch.tensor(sorted(set(ids)), dtype=input_ids.dtype, device=input_ids.device))

    end_of_turn = among(end_ids)
    special = among(special_ids) | end_of_turn
    if attention_mask is not None:
        special = special | (attention_mask == 0)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    after = positions > torch.where(visual, positions, -1).amax(1, keepdim=True)
    candidate = after & ~special
    first_text = _first(candidate, positions)
    end = torch.minimum(_first(after & special & (positions > first_text), positions),
                        _first(after & end_of_turn, positions))
    return candidate & (positions < end) & visual.any(1, keepdim=True)


def spans(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """(B, L) bool: the tokens from each start_id through the next end_id, both included (a start without an end
    runs to the row's end)."""
    opened, closed = (input_ids == start_id).cumsum(1), (input_ids == end_id).cumsum(1)
    return (opened > closed) | (input_ids == end_id)


def mean_embeddings(embeddings: torch.Tensor, mask: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """Per row, the float32 mean of embeddings (B, L, D) over mask (B, L), or None where the mask is empty."""
    out: list[Optional[torch.Tensor]] = []
    for row, keep in zip(embeddings, mask):
        out.append(row[keep].float().mean(0) if bool(keep.any()) else None)
    return out


def item_rows(placeholders: torch.Tensor, starts: Sequence[int]) -> list[int]:
    """The prompt row of each item, given where its placeholders start among placeholders (B, L) bool, counted
    row after row (items come in prompt order, each owning the next run of placeholders)."""
    per_row = placeholders.sum(1).cumsum(0).tolist()
    rows = []
    for start in starts:
        row = next((r for r, end in enumerate(per_row) if start < end), None)
        if row is None:
            raise ValueError(f"hiprune: an item starts at placeholder {start} but the prompt holds "
                             f"{per_row[-1] if per_row else 0}")
        rows.append(row)
    return rows
