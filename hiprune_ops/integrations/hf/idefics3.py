"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration).

The processor splits an image into fixed-size sub-images plus a downscaled global image; every one is a tile of
pixel_values owning image_seq_len placeholders (between its row / column marker tokens, which are never pruned).
The connector's pixel_shuffle (scale_factor s: 2 for Idefics3, 4 for SmolVLM) makes one language-model token of each
s x s group of patches, so the patch scores are averaged over those groups (grid.py) and the selection runs on the
shuffled grid. `budget` counts kept tokens per tile. Defaults: object layer round(depth * 9 / 24); deep layer = the
last (its output, after the post-layernorm, feeds the connector); ratio 1/3. Positions are recompacted.
The tower takes a patch padding mask; tiles that are padded (a pixel_attention_mask with zeros inside a real tile)
are refused, since their masked attention cannot be scored; the processor's tiles are never padded.
"""

from __future__ import annotations

import torch

from .. import families
from .grid import PooledGridAdapter


class Idefics3Adapter(PooledGridAdapter):
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    geometry = families.IDEFICS3  # pixel shuffle by the config's scale_factor

    def attention_modules(self):
        return [layer.self_attn for layer in self.model.model.vision_model.encoder.layers]

    def fixed_grid(self):
        config = self.model.config.vision_config
        return config.image_size // config.patch_size, config.image_size // config.patch_size

    def image_features(self, kwargs):
        pixel_values, mask = kwargs["pixel_values"], kwargs.get("pixel_attention_mask")
        if mask is not None:
            real = (pixel_values != 0).flatten(2).any(-1)  # the model drops all-zero (padding) tiles
            if not bool(mask[real].bool().all()):
                raise NotImplementedError(f"hiprune: {type(self.model).__name__} with padded tiles "
                                          "(pixel_attention_mask) is not supported: the tower's masked attention "
                                          "cannot be scored")
        per_row = self.model.model.get_image_features(pixel_values, mask).pooler_output
        h, w = self.fixed_grid()
        tokens = (h // self.pool_size()) * (w // self.pool_size())
        features = torch.cat(list(per_row))
        return features.reshape(-1, tokens, features.shape[-1])
