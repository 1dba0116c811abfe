"""Pixtral towers: LLaVA with a Pixtral tower (Pixtral-12B) and Mistral 3 (Mistral3ForConditionalGeneration).

The Pixtral tower runs every image at its own size, packed into one sequence: SDPA and eager get a block-diagonal
mask, flash gets cu_seqlens. The capture scores each image's block as a packed segment (the segments come from
image_sizes, as the tower's own), so every image is scored and pruned on its own (h / 14) x (w / 14) grid; Mistral 3
then merges each 2 x 2 group of patches into one token, so its scores are averaged over those groups and the
selection runs on the merged grid (grid.py). `budget` counts kept tokens per image, clamped to the image.
In the prompt an image is rows of [IMG] tokens, each row ended by [IMG_BREAK] (the last by [IMG_END]): only the
[IMG] tokens are pruned, so the kept tokens stay in their rows and every row marker stays (a row may become empty).
Defaults: object layer round(depth * 9 / 24); deep layer = the layer feeding the projector (vision_feature_layer,
-1 in the released models: the last); ratio 1/3 of each image's tokens. Positions are recompacted.
"""

from __future__ import annotations

import torch

from .. import families
from .grid import PooledGridAdapter


class PixtralAdapter(PooledGridAdapter):
    model_classes = ("PixtralVisionModel", "Mistral3ForConditionalGeneration")  # the tower decides (LLaVA too)
    concat_features = False

    def attention_modules(self):
        return [layer.attention for layer in self.model.model.vision_tower.transformer.layers]

    def _merged(self) -> bool:
        return hasattr(self.model.config, "spatial_merge_size")  # Mistral 3's patch merger

    @property
    def geometry(self):
        return families.MISTRAL3 if self._merged() else families.PIXTRAL

    def _patch_grids(self, kwargs):
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("hiprune: Pixtral towers need image_sizes (pass the processor's output unchanged)")
        patch = self.model.model.vision_tower.patch_size
        return [(int(h) // patch, int(w) // patch) for h, w in torch.as_tensor(image_sizes).tolist()]

    def tile_grids(self, kwargs, tiles):
        return self._patch_grids(kwargs)

    def segments(self, kwargs):
        counts = torch.tensor([0] + [h * w for h, w in self._patch_grids(kwargs)])
        return counts.cumsum(0).to(torch.int32, copy=False).to(kwargs["pixel_values"].device)

    def image_features(self, kwargs):
        model = self.model.model
        layer, strategy = self.feature_options(kwargs)
        common = dict(pixel_values=kwargs["pixel_values"], image_sizes=kwargs["image_sizes"],
                      vision_feature_layer=layer)
        if self._merged():  # Mistral 3 has no select strategy
            return model.get_image_features(**common).pooler_output
        if strategy != "full":
            raise NotImplementedError("hiprune: LLaVA with a Pixtral tower is supported with "
                                      "vision_feature_select_strategy='full' (the tower has no CLS token to drop)")
        return model.get_image_features(**common, vision_feature_select_strategy=strategy).pooler_output
