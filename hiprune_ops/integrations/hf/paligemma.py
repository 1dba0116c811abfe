"""PaliGemma 1 / 2 (PaliGemmaForConditionalGeneration): a SigLIP tower whose every patch is a language-model token.

No pooling (k = 1 in grid.py): the selection runs on the patch grid itself (16 x 16 at 224 px, 32 x 32 at 448,
64 x 64 at 896). `budget` counts kept tokens per image. token_type_ids shrink with the prompt, so the bidirectional
prefix (image + prompt) holds exactly the kept image tokens. Positions are recompacted (PaliGemma's own 1-based
positions over the shorter prompt).
Defaults: object layer round(depth * 9 / 24) (the 10th of SigLIP-so400m's 27); deep layer = the last (its output,
after the post-layernorm, feeds the projector); ratio 1/3 (85 of 256 at 224 px).
"""

from __future__ import annotations

from .. import families
from .grid import PooledGridAdapter


class PaliGemmaAdapter(PooledGridAdapter):
    model_classes = ("PaliGemmaForConditionalGeneration",)
    geometry = families.PALIGEMMA

    def attention_modules(self):
        return [layer.self_attn for layer in self.model.model.vision_tower.encoder.layers]

    def fixed_grid(self):
        config = self.model.config.vision_config
        return config.image_size // config.patch_size, config.image_size // config.patch_size

    def image_features(self, kwargs):
        return self.model.model.get_image_features(kwargs["pixel_values"]).pooler_output
