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

from ..selection import merge_scores, select_items
from .base import Adapter, EncodedImages

pool_scores = merge_scores  # the name the tests know


class PooledGridAdapter(Adapter):
    concat_features = True  # the model takes one (tokens, D) tensor of image features; False: a tuple per image

    # -- what a family declares (besides its geometry) ------------------------------------------------------------
    def attention_modules(self) -> list[torch.nn.Module]:
        """The tower's attention modules, first layer first."""
        raise NotImplementedError

    def fixed_grid(self) -> Optional[tuple[int, int]]:
        """The patch grid of every tile, or None when each tile has its own (then tile_grids says it)."""
        return None

    def tile_grids(self, kwargs: dict, tiles: int) -> list[tuple[int, int]]:
        return [self.fixed_grid()] * tiles

    def pool_size(self) -> int:
        return self.merge()

    def segments(self, kwargs: dict) -> Optional[torch.Tensor]:
        """cu_seqlens of the images the tower packs into one sequence behind a block-diagonal mask, else None."""
        return None

    def image_features(self, kwargs: dict) -> Sequence[torch.Tensor]:
        """Per tile (tokens, D): the projected features of every token, from the model's own get_image_features."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------------
    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options)
        self.attentions = self.attention_modules()
        self.resolve_layers(len(self.attentions))
        grid, k = self.fixed_grid(), self.pool_size()
        # One size for every tile: the kept count is known (and a budget above it refused) now; else per tile.
        self.per_tile = None if grid is None else self.keep((grid[0] // k) * (grid[1] // k))

    def attention(self, layer):
        return self.attentions[layer - 1]

    def _scores(self, scores: torch.Tensor, grids: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The layer's patch scores split per tile (padded batches (B, N) and packed (T,) alike)."""
        counts = [h * w for h, w in grids]
        scores = scores.reshape(-1)
        if scores.numel() != sum(counts):
            shapes = ", ".join(sorted({f"{h}x{w}" for h, w in grids}))
            raise ValueError(f"hiprune: the tower produced {scores.numel()} patch scores, not the {sum(counts)} of "
                             f"the tiles' patch grids ({shapes}); pixel_values must have the configured image_size")
        return scores.split(counts)

    def encode_images(self, kwargs) -> EncodedImages:
        self.capture.arm(self.segments(kwargs))
        try:
            features = self.image_features(kwargs)
            grids = self.tile_grids(kwargs, len(features))
            obj, deep = (self._scores(scores, grids) for scores in self.capture.take())
        finally:
            self.capture.disarm()
        k = self.pool_size()
        keeps = [self.per_tile or self.keep((h // k) * (w // k)) for h, w in grids]
        counts = [(h // k) * (w // k) for h, w in grids]
        indices, roles = select_items(obj, deep, grids, keeps, self.settings, merge=k, features=features,
                                      prompts=self.item_prompts("image", counts))
        kept = [tile_features[index] for tile_features, index in zip(features, indices)]
        return EncodedImages(kept, counts, list(indices), indices, roles)

    def encoder_outputs(self, encoded, new):
        outputs = super().encoder_outputs(encoded, new)
        if self.concat_features:
            outputs["image"].pooler_output = torch.cat(outputs["image"].pooler_output)
        return outputs
