"""InternVL 3 / 3.5 (InternVLForConditionalGeneration): InternViT with a CLS token, pixel_shuffle 0.5, MLP projector.

The processor cuts an image into 448 x 448 tiles plus a thumbnail (the last tile) and turns a video into frames;
all of them arrive as rows of pixel_values, each owning image_seq_length (256) placeholders. Each tile, thumbnail
and frame is pruned on its own: pixel_shuffle 0.5 makes one language-model token of each 2 x 2 group of patches,
so the patch scores are averaged over those groups (see grid.py) and the selection runs on the 16 x 16 shuffled
grid. `budget` counts kept tokens per tile (thumbnail and video frame alike), out of 256.
Defaults: object layer round(depth * 9 / 24) (the 9th of InternViT-300M's 24); deep layer = the layer feeding the
projector (vision_feature_layer -1 -> the last); ratio 1/3 (85 of 256 per tile). Positions are recompacted.
"""

from __future__ import annotations

from .. import families
from .grid import PooledGridAdapter


class InternVLAdapter(PooledGridAdapter):
    model_classes = ("InternVLForConditionalGeneration",)
    geometry = families.INTERNVL  # CLS, pixel shuffle 2, deep layer feeds the projector

    def attention_modules(self):
        return [layer.attention for layer in self.model.model.vision_tower.encoder.layer]

    def fixed_grid(self):
        config = self.model.config.vision_config
        pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
        return tuple(size // patch for size, patch in zip(pair(config.image_size), pair(config.patch_size)))

    def pool_size(self):
        ratio = self.model.config.downsample_ratio
        if ratio != 0.5:
            raise NotImplementedError(f"hiprune: InternVL with downsample_ratio={ratio} is not supported (0.5 is: "
                                      "each language-model token is a 2x2 group of patches)")
        return super().pool_size()

    def image_features(self, kwargs):
        layer, strategy = self.feature_options(kwargs)
        if strategy != "default":
            raise NotImplementedError("hiprune: InternVL is supported with vision_feature_select_strategy='default' "
                                      "(the CLS token dropped before pixel_shuffle)")
        return self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], vision_feature_layer=layer,
                                                   vision_feature_select_strategy=strategy).pooler_output
