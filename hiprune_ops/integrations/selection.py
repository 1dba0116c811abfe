"""The one selection step every binding runs: per item scores -> kept count -> select_with_roles -> kept indices.

An item is whatever gets its own selection: an image, a tile, a video slice. Its object and deep scores come in
raster order over its patch grid (h, w); with merge k > 1 they are averaged over each k x k group first, exactly as
the features are (spatial merge, pixel shuffle, average pool), and the selection runs on the (h / k, w / k) grid.
Items of the same grid and kept count go through one select_with_roles call (the op selects each row on its own,
so batching changes no index). Gathering the kept features is the caller's (features differ per framework).

HiPrune++ (settings.prompt_beta > 0): an item given its features (every token, as the language model receives them,
in the order of the merged grid) and its prompt embedding then gets prompt_extra_count(keep, n, prompt_beta) more
tokens, the not-kept ones most similar to the prompt (prompt_select, role 3). An item whose prompt is None (its
prompt has no text) gets none.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops


def merge_scores(scores: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """(B, grid_h * grid_w) patch scores -> (B, grid_h / k * grid_w / k): the mean of each k x k group, raster."""
    if k == 1:
        return scores
    pooled = torch.nn.functional.avg_pool2d(scores.reshape(-1, 1, grid_h, grid_w), k, k)
    return pooled.flatten(1)


def select_items(object_scores: Sequence[torch.Tensor], deep_scores: Sequence[torch.Tensor],
                 grids: Sequence[tuple[int, int]], keeps: Sequence[int], settings, *, merge: int = 1,
                 skip_full: bool = False, features: Optional[Sequence[torch.Tensor]] = None,
                 prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 ) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """(indices, roles) per item: int64 (keep [+ t],) raster indices into the item's merged grid, int8 roles.

    object_scores / deep_scores: per item, (h * w,) scores on its patch grid; grids: per item (h, w); keeps: per
    item, tokens kept on the merged grid (settings.keep gives them); settings: alpha, neighborhood, official,
    prompt_beta. skip_full: an item that keeps all its tokens is not selected and gets None (the caller passes it
    through). features / prompts (HiPrune++, read when settings.prompt_beta > 0): per item, (n, D) every token of
    its merged grid and (D,) its prompt embedding or None (no text: no extra tokens).
    """
    count = len(grids)
    if not (len(object_scores) == len(deep_scores) == len(keeps) == count):
        raise ValueError(f"select_items: {len(object_scores)} object, {len(deep_scores)} deep scores, "
                         f"{len(keeps)} kept counts for {count} items")
    indices: list[Optional[torch.Tensor]] = [None] * count
    roles: list[Optional[torch.Tensor]] = [None] * count
    groups: dict[tuple[int, int, int], list[int]] = {}
    for item, ((h, w), keep) in enumerate(zip(grids, keeps)):
        if skip_full and keep >= (h // merge) * (w // merge):
            continue
        groups.setdefault((h, w, keep), []).append(item)
    for (h, w, keep), members in groups.items():
        obj, deep = (merge_scores(torch.stack([scores[i].reshape(-1) for i in members]), h, w, merge)
                     for scores in (object_scores, deep_scores))
        chosen, role = ops.select_with_roles(obj, deep, keep, h // merge, w // merge, float(settings.alpha), 0,
                                             settings.neighborhood, bool(settings.official))
        for item, index, item_role in zip(members, chosen, role):
            indices[item], roles[item] = index, item_role
        if prompts is not None and settings.prompt_beta > 0:
            add_prompt_tokens([i for i in members if prompts[i] is not None], features, prompts, indices, roles,
                              float(settings.prompt_beta))
    return indices, roles


def add_prompt_tokens(members: Sequence[int], features: Sequence[torch.Tensor],
                      prompts: Sequence[Optional[torch.Tensor]], indices: list, roles: list, beta: float) -> None:
    """HiPrune++ on items of one grid and kept count: one prompt_select call, indices / roles replaced in place."""
    if not members:
        return
    if features is None or len(features) != len(prompts):
        raise ValueError("select_items: HiPrune++ needs the features of every item, one per prompt")
    stacked = torch.stack([features[i] for i in members])
    prompt = torch.stack([prompts[i].to(stacked.device) for i in members])
    chosen, role = ops.prompt_select(stacked, prompt, torch.stack([indices[i] for i in members]),
                                     torch.stack([roles[i] for i in members]), beta)
    for item, index, item_role in zip(members, chosen, role):
        indices[item], roles[item] = index, item_role
