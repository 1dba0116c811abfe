"""Gemma 4 (Gemma4ForConditionalGeneration): a ViT that takes each image at its own size, padded, then pooled.

The processor turns an image into its patches (a (H, W) patch grid, H and W multiples of the pooling kernel k)
padded to one fixed length, with pixel_position_ids (x, y) per patch and (-1, -1) at padding; the tower attends
behind a key-padding mask, and its pooler averages each k x k group of real patches into one soft token, in raster
order over the (H / k, W / k) pooled grid. So each image is pruned on its own:
- scores: the capture scores only the real patches of each row (softmax over real keys, mean over real queries;
  capture.py), put on the image's patch grid by their positions and averaged over each k x k group, exactly as
  the pooler averages the features;
- selection on the pooled grid; the model's own get_image_features gives every soft token and the kept ones are
  gathered, so at full budget the language model gets exactly what it gets unpatched;
- `budget` counts kept soft tokens per image, clamped to the image (images have 70 to 1120).
Video: every frame is an image of its own (pixel_values_videos, video_position_ids), owning the next run of video
placeholders; each keeps `video_budget` or `video_ratio` of its soft tokens (default: the image setting).
mm_token_type_ids shrink with the prompt, so each image's bidirectional block holds exactly its kept tokens.
Defaults: object layer round(depth * 9 / 24) (6 of the 16 released layers); deep layer = the last (its output feeds
the pooler); ratio 1/3. Positions are recompacted.
"""

from __future__ import annotations

import torch

from .. import families
from ..selection import select_items
from .base import Adapter, EncodedImages


class Gemma4Adapter(Adapter):
    model_classes = ("Gemma4ForConditionalGeneration",)
    geometry = families.GEMMA4
    media_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    position_keys = {"image": "image_position_ids", "video": "video_position_ids"}

    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options)
        self.layers = model.model.vision_tower.encoder.layers
        self.resolve_layers(len(self.layers))

    def attention(self, layer):
        return self.layers[layer - 1].self_attn

    def _features(self, kind: str, kwargs: dict, grids) -> list[torch.Tensor]:
        """Per image or frame (tokens, D): the projected soft tokens of the model's own get_*_features."""
        model, k = self.model.model, self.merge()
        if kind == "image":
            return list(model.get_image_features(kwargs["pixel_values"], kwargs["image_position_ids"]).pooler_output)
        frames = kwargs.get("num_frames_per_video")
        if frames is None:
            raise ValueError("hiprune: pixel_values_videos needs num_frames_per_video (pass the processor's output "
                             "unchanged)")
        per_video = model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_position_ids"],
                                             num_frames_per_video=frames).pooler_output
        return list(torch.cat(per_video).split([(h // k) * (w // k) for h, w in grids]))

    def encode(self, kwargs):
        encoded = {}
        for kind, key in self.media_keys.items():
            if kwargs.get(key) is None:
                continue
            positions = kwargs.get(self.position_keys[kind])
            if positions is None:
                raise ValueError(f"hiprune: {key} needs {self.position_keys[kind]}")
            grids = families.position_grids(positions, self.merge(), self.position_keys[kind])
            features, (obj, deep) = self.capture.scored(lambda: self._features(kind, kwargs, grids))
            obj, deep = ([families.raster_by_position(s, p, g) for s, p, g in zip(scores, positions, grids)]
                         for scores in (obj, deep))
            k = self.merge()
            counts = [(h // k) * (w // k) for h, w in grids]
            keeps = [self.keep(n, kind) for n in counts]
            indices, roles = select_items(obj, deep, grids, keeps, self.settings, merge=k, features=features,
                                          prompts=self.item_prompts(kind, counts))
            kept = [item[index] for item, index in zip(features, indices)]
            encoded[kind] = EncodedImages(kept, counts, list(indices), list(indices), list(roles))
        return encoded
