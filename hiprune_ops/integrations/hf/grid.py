"""Families whose language-model token is a k x k group of patches of one tile, selected tile by tile.

InternVL 3/3.5 (pixel_shuffle 0.5: k = 2), Gemma 3 (4 x 4 average pool: k = 4), PaliGemma (k = 1): fixed-size
tiles; Pixtral (k = 1) and Mistral 3 (2 x 2 patch merger: k = 2): one tile per image, of the image's own size.
A tile (an image, a tile or thumbnail of an image, a video frame) owns the next run of placeholders, in order, one
per token of its pooled grid. Each tile is its own selection:
- the object and deep scores of its patches are averaged over each k x k group, exactly as the features are
  (avg_pool2d, kernel and stride k), and HiPrune selects on the pooled grid;
- the model's own get_image_features (tower, pooling or merger, projector) gives every token and the kept ones are
  gathered, so at full budget the language model gets exactly what it gets unpatched.
`budget` counts kept tokens per tile (clamped to the tile when tiles differ in size); the language model's 1-D
positions are recompacted (the prompt is shorter).
A family declares its model classes, the tower's attention modules, its prefix, its grid (fixed_grid) or the grid
of each tile (tile_grids), k, the layer that feeds the projector, and how to call get_image_features.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import ops
from .. import capture
from ..towers import default_object_layer, resolve_budget, resolve_layer
from .base import Adapter, EncodedImages


def pool_scores(scores: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """(B, grid_h * grid_w) patch scores -> (B, grid_h / k * grid_w / k): the mean of each k x k group, raster."""
    if k == 1:
        return scores
    pooled = torch.nn.functional.avg_pool2d(scores.reshape(-1, 1, grid_h, grid_w), k, k)
    return pooled.flatten(1)


class PooledGridAdapter(Adapter):
    default_ratio = 1 / 3
    concat_features = True  # the model takes one (tokens, D) tensor of image features; False: a tuple per image

    # -- what a family declares --------------------------------------------------------------------------------
    def attention_modules(self) -> list[torch.nn.Module]:
        """The tower's attention modules, first layer first."""
        raise NotImplementedError

    def fixed_grid(self) -> Optional[tuple[int, int]]:
        """The patch grid of every tile, or None when each tile has its own (then tile_grids says it)."""
        return None

    def tile_grids(self, kwargs: dict, tiles: int) -> list[tuple[int, int]]:
        return [self.fixed_grid()] * tiles

    def pool_size(self) -> int:
        return 1

    def default_deep_layer(self, depth: int) -> int:
        return depth

    def segments(self, kwargs: dict) -> Optional[torch.Tensor]:
        """cu_seqlens of the images the tower packs into one sequence behind a block-diagonal mask, else None."""
        return None

    def image_features(self, kwargs: dict) -> Sequence[torch.Tensor]:
        """Per tile (tokens, D): the projected features of every token, from the model's own get_image_features."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------------
    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **video):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **video)
        self.attentions = self.attention_modules()
        depth = len(self.attentions)
        self.object_layer = resolve_layer(object_layer, depth, default_object_layer(depth), "object_layer")
        self.deep_layer = resolve_layer(deep_layer, depth, self.default_deep_layer(depth), "deep_layer")
        grid, k = self.fixed_grid(), self.pool_size()
        if grid is None:  # validated now, clamped to each tile later
            self.per_tile = None
            resolve_budget(budget, ratio, 10 ** 9, self.default_ratio)
        else:
            self.per_tile = resolve_budget(budget, ratio, (grid[0] // k) * (grid[1] // k), self.default_ratio)

    def attention(self, layer):
        return self.attentions[layer - 1]

    def _scores(self, slot, layer: int, grids: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The layer's patch scores split per tile (padded batches (B, N) and packed (T,) alike)."""
        counts = [h * w for h, w in grids]
        scores = slot.single_score(layer).reshape(-1)
        if scores.numel() != sum(counts):
            shapes = ", ".join(sorted({f"{h}x{w}" for h, w in grids}))
            raise ValueError(f"hiprune: the tower produced {scores.numel()} patch scores, not the {sum(counts)} of "
                             f"the tiles' patch grids ({shapes}); pixel_values must have the configured image_size")
        return scores.split(counts)

    def encode_images(self, kwargs) -> EncodedImages:
        layers = (self.object_layer, self.deep_layer)
        slots = [capture.slot_of(self.attention(layer)) for layer in layers]
        segments = self.segments(kwargs)
        for slot in slots:
            slot.reset()
            slot.segments = segments
        try:
            features = self.image_features(kwargs)
            grids = self.tile_grids(kwargs, len(features))
            obj, deep = (self._scores(slot, layer, grids) for slot, layer in zip(slots, layers))
        finally:
            for slot in slots:
                slot.reset()
                slot.segments = None
        k = self.pool_size()
        tiles = len(grids)
        result = EncodedImages([None] * tiles, [(h // k) * (w // k) for h, w in grids], [None] * tiles,
                               [None] * tiles, [None] * tiles)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for tile, grid in enumerate(grids):
            by_grid.setdefault(grid, []).append(tile)
        for (h, w), members in by_grid.items():  # tiles of one size: one selection call
            pooled = [pool_scores(torch.stack([s[t] for t in members]), h, w, k) for s in (obj, deep)]
            keep = self.per_tile or resolve_budget(self.budget, self.ratio, (h // k) * (w // k), self.default_ratio,
                                                   clamp=True)
            indices, roles = ops.select_with_roles(pooled[0], pooled[1], keep, h // k, w // k, self.alpha, 0,
                                                   self.neighborhood, self.official)
            for tile, index, role in zip(members, indices, roles):
                result.features[tile] = features[tile][index]
                result.kept_slots[tile] = result.indices[tile] = index
                result.roles[tile] = role
        return result

    def encoder_outputs(self, encoded, new):
        outputs = super().encoder_outputs(encoded, new)
        if self.concat_features:
            outputs["image"].pooler_output = torch.cat(outputs["image"].pooler_output)
        return outputs
