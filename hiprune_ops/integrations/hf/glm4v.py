"""GLM-4.1V / 4.5V / 4.6V (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration,
Glm46VForConditionalGeneration): the Qwen-VL pipeline with per-frame video encoding and one placeholder id for
images and videos.

- A video goes through the tower as one grid (1, h, w) per temporal slice (cu_seqlens per frame), as
  get_video_features does; each slice is then pruned on its own grid like every Qwen-style video.
- A video's prompt interleaves its frames with their timestamps (`<|begin_of_image|>` placeholders
  `<|end_of_image|>` seconds, per frame) between `<|begin_of_video|>` and `<|end_of_video|>`: all of it is the
  video, so HiPrune++'s prompt text (prompt.py's rule) starts after `<|end_of_video|>`, never at the last timestamp.
- Video placeholders use the image token id; mm_token_type_ids (the processor's output, 1 image, 2 video) tells
  them apart and is required with videos. transformers scatters images and videos into that one id, so a prompt
  with both is handed over as one image stream in prompt order (transformers itself cannot take such a prompt).
Object block: round(depth / 2); deep block: the last.
"""

from __future__ import annotations

import torch

from .. import families, prompt
from .qwen_vl import KIND_TYPE, QwenVLAdapter


class Glm4vAdapter(QwenVLAdapter):
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
                     "Glm46VForConditionalGeneration")
    geometry = families.GLM4V  # video: one tower grid per frame

    def run_tower(self, kind, pixel_values, grid_thw):
        if kind == "video":
            per_frame = torch.cat([torch.ones_like(grid_thw[:, :1]), grid_thw[:, 1:]], dim=1)
            grid_thw = per_frame.repeat_interleave(grid_thw[:, 0], dim=0)
        return super().run_tower(kind, pixel_values, grid_thw)

    def token_types(self, kwargs):
        types = kwargs.get("mm_token_type_ids")
        if types is None:
            if kwargs.get("pixel_values_videos") is not None:
                raise ValueError("hiprune: GLM-4V videos need mm_token_type_ids (the processor's output): video "
                                 "frames use the image placeholder id")
            return (kwargs["input_ids"] == self.image_token_id).int()
        return types

    def prompt_visual(self, kwargs):
        visual = super().prompt_visual(kwargs)
        if kwargs.get("pixel_values_videos") is None:
            return visual
        config = self.model.config  # the video's markers and timestamps count as visual: the text follows them
        return visual | prompt.spans(kwargs["input_ids"], config.video_start_token_id, config.video_end_token_id)

    def placeholder_mask(self, kind, kwargs):
        return (kwargs["input_ids"] == self.image_token_id) & (self.token_types(kwargs) == KIND_TYPE[kind])

    def encoder_outputs(self, encoded, new):
        if len(encoded) < 2:
            return super().encoder_outputs(encoded, new)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        types = new["mm_token_type_ids"][new["input_ids"] == self.image_token_id]
        images, videos = torch.cat(encoded["image"].features), torch.cat(encoded["video"].features)
        stream = images.new_empty(types.shape[0], images.shape[-1])
        stream[types == KIND_TYPE["image"]] = images
        stream[types == KIND_TYPE["video"]] = videos
        return {"image": BaseModelOutputWithPooling(pooler_output=(stream,))}
