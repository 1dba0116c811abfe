"""HiPrune for vLLM's Glm4vForConditionalGeneration and Glm4vMoeForConditionalGeneration (GLM-4.1V, GLM-4.5V, and
GLM-4.6V checkpoints that name these classes): the Qwen-style binding (qwen_vl.py) on GLM's classes.

Geometry: families.GLM4V, as in the transformers integration (object block round(depth / 2), deep block the last;
ratio 0.334). GLM's tower is Qwen2-VL's in shape: packed patches in merge-unit order, one cu_seqlens segment per
image (per frame for a video), and its 2x2 stride-2 `downsample` makes one token of each unit, so the scores
average the same four patches, in raster order. Images are pruned, and videos frame by frame (each temporal slice
of temporal_patch_size frames is one "frame" of GLM's prompt, with its own timestamp and image placeholders).
Positions: vLLM's iter_mm_grid_thw asserts an image holds its full h * w tokens (a pruned prompt would fail), so
hiprune_media reads the items itself; the M-RoPE rule is the same as Qwen2-VL's (text after an item continues
after its full grid).
"""

from __future__ import annotations

from .. import families
from .qwen_vl import QwenModelMixin, QwenProcessorMixin
from vllm.model_executor.models.glm4_1v import (Glm4vDummyInputsBuilder, Glm4vForConditionalGeneration,
                                                Glm4vMoeForConditionalGeneration, Glm4vMultiModalProcessor,
                                                Glm4vProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneGlm4vMultiModalProcessor(QwenProcessorMixin, Glm4vMultiModalProcessor):
    geometry = families.GLM4V

    def _video_embed_token(self) -> int:
        return self.info.get_hf_config().image_token_id  # GLM's video frames take the image placeholder


class Glm4vStyleMixin(QwenModelMixin):
    geometry = families.GLM4V

    def hiprune_media(self, input_tokens, mm_features):
        """(offset, t, h, w, 1.0, feature) per image, and per frame of a video, in prompt order (merged grids): vLLM's
        iter_mm_grid_thw without its full-count assertion. Checked: vllm 0.32.0, MultiModalFeatureSpec (data,
        modality, mm_position) and PlaceholderRange.extract_embeds_range."""
        merge = self.config.vision_config.spatial_merge_size
        media = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            t, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            ranges = feature.mm_position.extract_embeds_range()
            if feature.modality == "video" and len(ranges) == t:  # one run of placeholders per frame
                media.extend((start, 1, h // merge, w // merge, 1.0, feature) for start, _ in ranges)
            else:
                media.append((ranges[0][0], t, h // merge, w // merge, 1.0, feature))
        return media


@MULTIMODAL_REGISTRY.register_processor(HiPruneGlm4vMultiModalProcessor, info=Glm4vProcessingInfo,
                                        dummy_inputs=Glm4vDummyInputsBuilder)
class HiPruneGlm4vForConditionalGeneration(Glm4vStyleMixin, Glm4vForConditionalGeneration):
    architecture = "Glm4vForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(HiPruneGlm4vMultiModalProcessor, info=Glm4vProcessingInfo,
                                        dummy_inputs=Glm4vDummyInputsBuilder)
class HiPruneGlm4vMoeForConditionalGeneration(Glm4vStyleMixin, Glm4vMoeForConditionalGeneration):
    architecture = "Glm4vMoeForConditionalGeneration"
