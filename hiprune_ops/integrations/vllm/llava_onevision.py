"""HiPrune for vLLM's LlavaOnevisionForConditionalGeneration (SigLIP tower, vision_feature_select_strategy "full";
images, and videos frame by frame).

Geometry: families.LLAVA_ONEVISION, as in the transformers integration (hf/llava_onevision.py): LLaVA-NeXT's AnyRes
tiles (llava_next.py) under a SigLIP tower without CLS; object layer round(depth * 9 / 24), deep layer the one
feeding the projector. A budget counts over the base tile and its tiles (budget // tiles per tile, at most a tile's
tokens), a ratio applies per tile. Processor: a pruned image gets tiles x kept placeholders; an unpruned one vLLM's
count (base, unpadded tiles downscaled past anyres_max, a newline per row). Encoder: each tile selected on its own;
a pruned image is its base tile's kept tokens, then the other tiles' in raster order of the tiled grid, without
unpadding, downscale or newlines (as apply_hiprune packs it); an image that keeps every token is packed by vLLM's
own code. vLLM treats every image of a multi-image prompt as AnyRes tiles, and so does this binding. 1-D positions,
recompacted.
Videos (vLLM 0.32.0's layout: one run of video placeholders per video, frames x pooled tokens, then one newline
token): every frame runs through the tower and projector and is pooled bilinearly to ceil(h / 2) x ceil(w / 2), its
patch scores pooled the same way (families.bilinear_pool); each frame keeps `video_budget` / `video_ratio` of its
pooled tokens (default: the image setting), selected on the pooled grid, and the video's run shrinks to frames x
kept + 1, the newline last: the tokens apply_hiprune keeps (hf/llava_onevision.py).
HiPrune++: images as LLaVA-NeXT's (llava_next.py: extra tokens per tile); every video frame gets
prompt_extra_count(its kept, its pooled tokens) extra tokens, ranked on its pooled tokens, the run then frames x
(kept + extra) + 1, as apply_hiprune's.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import families
from . import _vllm_api
from ._common import StashedKeepModelMixin, kept_count_of, tile_prompts
from .llava_next import AnyResModelMixin, AnyResProcessorMixin, tile_keep_counts
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


def siglip_tower_unsupported(config):
    """Why the plugin cannot prune this LLaVA-OneVision checkpoint (it needs a SigLIP tower, strategy "full" and one
    feature layer), or None."""
    if config.vision_config.model_type != "siglip_vision_model":
        return (f"hiprune: LLaVA-OneVision with a {config.vision_config.model_type} tower is not supported by the "
                "vLLM plugin (SigLIP only)")
    if config.vision_feature_select_strategy != "full" or not isinstance(config.vision_feature_layer, int):
        return "hiprune: LLaVA-OneVision is supported with vision_feature_select_strategy='full' and one " \
               "vision_feature_layer"
    return None


# vLLM's ModelConfig -> why the plugin cannot prune it (processor and model: _common.first_reason).
REFUSALS = (lambda model_config, architecture: siglip_tower_unsupported(model_config.hf_config),)


def frame_tokens(config) -> int:
    """Pooled tokens of one video frame."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    height, width = families.bilinear_pooled_grid(grid, grid)
    return height * width


class HiPruneLlavaOnevisionMultiModalProcessor(AnyResProcessorMixin, LlavaOnevisionMultiModalProcessor):
    geometry = families.LLAVA_ONEVISION
    video_pruned = video_prompt_aware = True
    config_refusals = REFUSALS

    def _full_count(self, config, image_size) -> int:
        height, width = (int(v) for v in image_size)
        return self.info.get_num_image_tokens(image_width=width, image_height=height)

    def _video_slice_counts(self, processed) -> list[tuple[int, int]]:
        videos = processed.get("pixel_values_videos")
        if videos is None:
            return []
        per_frame = frame_tokens(self.info.get_hf_config())
        return [(int(video.shape[0]), per_frame) for video in videos]

    def _video_item_slices(self, item) -> int:
        return int(item["pixel_values_videos"].data.shape[0])

    def _video_embed_token(self) -> int:
        return self.info.get_hf_config().video_token_index

    def _video_replacement(self, original, out_mm_kwargs):
        """vLLM's run of frames x pooled tokens + 1 (the newline) placeholders, cut to frames x kept + 1 (kept: a
        frame's kept and extra tokens)."""
        token = self._video_embed_token()

        def replacement(item_idx: int):
            kept = kept_count_of(out_mm_kwargs, item_idx, "video")
            if kept is None:
                return original(item_idx)
            return [token] * (self._video_item_slices(out_mm_kwargs["video"][item_idx]) * kept + 1)

        return replacement


@MULTIMODAL_REGISTRY.register_processor(HiPruneLlavaOnevisionMultiModalProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class HiPruneLlavaOnevisionForConditionalGeneration(AnyResModelMixin, StashedKeepModelMixin,
                                                    LlavaOnevisionForConditionalGeneration):
    geometry = families.LLAVA_ONEVISION
    architecture = "LlavaOnevisionForConditionalGeneration"
    video_pruned = True
    config_refusals = REFUSALS

    def hiprune_take_keep(self, kwargs: dict):
        return tile_keep_counts(kwargs)

    # Override of LlavaOnevisionForConditionalGeneration._process_image_input (vLLM's images of one
    # embed_multimodal call -> per image its embeddings; its videos go their own way); checked: vllm 0.32.0.
    def _process_image_input(self, image_input):
        pruned = self.hiprune_anyres_images(image_input, self._hiprune_keep, self._hiprune_prompts)
        return super()._process_image_input(image_input) if pruned is None else pruned

    def _tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_next_tile_features(self, pixels)  # strategy "full": SigLIP has no CLS to drop

    def _packed(self, image_size, tile_embeddings: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_onevision_packed(self, image_size, tile_embeddings)

    # Override of LlavaOnevisionForConditionalGeneration._process_video_pixels (vLLM's videos of one embed_multimodal
    # call -> per video its frames' pooled tokens, then the newline); checked: vllm 0.32.0.
    def _process_video_pixels(self, inputs):
        pruned = self.hiprune_videos(inputs["pixel_values_videos"], self._hiprune_video_keep,
                                     self._hiprune_video_prompts)
        return super()._process_video_pixels(inputs) if pruned is None else pruned

    def hiprune_videos(self, videos, keep: Optional[list[int]], prompts=None) -> Optional[list[torch.Tensor]]:
        """Per video, its frames' kept pooled tokens, frame after frame, then the newline token; None when no video
        is pruned (keep: per video, the tokens each frame keeps). prompts (prompt_inputs, per video): HiPrune++,
        every frame getting its video's per-frame extra tokens, ranked on its pooled tokens."""
        per_frame = frame_tokens(self.config)
        if keep is None or all(k >= per_frame for k in keep):
            return None
        if self.hiprune_unsupported is not None:
            raise ValueError(self.hiprune_unsupported)
        frames = [int(video.shape[0]) for video in videos]
        if len(keep) != len(frames):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(frames)} videos")
        pixels = torch.cat(list(videos))
        pooled, scores = self.hiprune_taps.scored(lambda: _vllm_api.llava_onevision_video_features(self, pixels))
        grid = self.hiprune_grid
        object_scores, deep_scores = (families.bilinear_pool(s, grid, grid) for s in scores)
        frame_keep = [k for k, count in zip(keep, frames) for _ in range(count)]
        indices = self.hiprune_select(object_scores.unbind(0), deep_scores.unbind(0),
                                      [families.bilinear_pooled_grid(grid, grid)] * pooled.shape[0], frame_keep,
                                      features=None if prompts is None else list(pooled),
                                      prompts=tile_prompts(prompts, frames))
        kept = [frame if index is None else frame[index] for frame, index in zip(pooled, indices)]
        newline = self.image_newline[None].to(pooled.dtype)
        starts = [sum(frames[:i]) for i in range(len(frames))]
        return [torch.cat(kept[start:start + count] + [newline]) for start, count in zip(starts, frames)]
