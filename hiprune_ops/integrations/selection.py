"""The one selection step every binding runs: per item scores -> kept count -> select_with_roles -> kept indices.

An item is whatever gets its own selection: an image, a tile, a video slice. Its object and deep scores come in
raster order over its patch grid (h, w); with merge k > 1 they are averaged over each k x k group first, exactly as
the features are (spatial merge, pixel shuffle, average pool), and the selection runs on the (h / k, w / k) grid.
Items of the same grid and kept count go through one select_with_roles call (the op selects each row on its own,
so batching changes no index). Gathering the kept features is the caller's (features differ per framework).
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
                 skip_full: bool = False) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """(indices, roles) per item: int64 (keep,) raster indices into the item's merged grid, int8 (keep,) roles.

    object_scores / deep_scores: per item, (h * w,) scores on its patch grid; grids: per item (h, w); keeps: per
    item, tokens kept on the merged grid (settings.keep gives them); settings: alpha, neighborhood, official.
    skip_full: an item that keeps all its tokens is not selected and gets None (the caller passes it through).
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
    return indices, roles
