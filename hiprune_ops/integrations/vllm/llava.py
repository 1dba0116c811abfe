"""HiPrune for vLLM's LlavaForConditionalGeneration (CLIP tower, vision_feature_select_strategy "default").

Geometry: families.LLAVA (CLS prefix, no merge; object layer round(depth * 9 / 24) of the full tower, deep layer the
one feeding the projector: the last layer vLLM builds). Processor: each image gets its kept count of placeholders.
Encoder: the object and deep layers' q and k are scored in vLLM's CLIP attention (CLS row included, CLS column
dropped), the selection step picks the kept patches, and only they go through the projector (HiPrune++: every patch
goes through it, the prompt tokens being ranked on the projected features). The prompt is simply
shorter: positions of the kept tokens are recompacted, as in the authors' release.
"""

from __future__ import annotations

import torch

from .. import families
from . import _vllm_api
from ._common import ClipLlavaModelMixin, ProcessorMixin, clip_tower_refusal, keep_counts, prompt_inputs
from .refusal import refuse_request_keys
from .settings import HiPruneSettings
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

REFUSALS = (clip_tower_refusal("LLaVA"),)


class HiPruneLlavaMultiModalProcessor(ProcessorMixin, LlavaMultiModalProcessor):
    geometry = families.LLAVA
    prompt_aware = True
    config_refusals = REFUSALS

    def _image_token_counts(self, processed) -> list[int]:
        pixel_values = processed.get("pixel_values")
        if pixel_values is None:
            return []
        size = self.info.get_image_size_with_most_features()  # LLaVA-1.5 resizes every image to the tower's size
        n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
        return [n] * len(pixel_values)


def _build_processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return HiPruneLlavaMultiModalProcessor(info, dummy_inputs)
    reason = (f"hiprune: LlavaForConditionalGeneration with {type(info).__name__} (a Pixtral-style LLaVA) is not "
              "supported by the vLLM plugin")
    if HiPruneSettings.from_hf_config(info.get_hf_config()).enabled:
        raise NotImplementedError(reason)
    return refuse_request_keys(_vllm_api.llava_processor_factory()(info, dummy_inputs), reason)  # vLLM's own


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_vllm_api.llava_processing_info_factory(),
                                        dummy_inputs=LlavaDummyInputsBuilder)
class HiPruneLlavaForConditionalGeneration(ClipLlavaModelMixin, LlavaForConditionalGeneration):
    geometry = families.LLAVA
    architecture = "LlavaForConditionalGeneration"
    prompt_aware = True
    config_refusals = REFUSALS

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.hiprune_unsupported is None:
            # Every image has the grid's tokens: a budget above them is refused now, not per request.
            self.hiprune_settings.keep_count(self.hiprune_grid ** 2, default_ratio=self.geometry.default_ratio)

    def embed_multimodal(self, **kwargs):
        keep = keep_counts(kwargs)
        prompts = prompt_inputs(kwargs)
        image_input = _vllm_api.parse_image_input(self, kwargs)
        if image_input is None:
            return []
        if self.hiprune_unsupported is not None:
            patches = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
            if keep is not None and any(k < patches for k in keep):
                raise ValueError(self.hiprune_unsupported)
            return _vllm_api.llava_image_embeddings(self, image_input)
        grid = self.hiprune_grid
        if keep is None or image_input["type"] != "pixel_values" or all(k >= grid * grid for k in keep):
            return _vllm_api.llava_image_embeddings(self, image_input)
        features, (object_scores, deep_scores) = self.hiprune_taps.scored(
            lambda: _vllm_api.llava_image_features(self, image_input))  # (B, N, C): CLS already dropped
        # HiPrune++ ranks every token as the language model receives it (projected); HiPrune alone projects only
        # the kept ones.
        projected = None if prompts is None else self.multi_modal_projector(features)
        indices = self.hiprune_select(object_scores.unbind(0), deep_scores.unbind(0),
                                      [(grid, grid)] * features.shape[0], keep,
                                      features=None if projected is None else projected.unbind(0), prompts=prompts)
        if projected is not None:
            return tuple(image if index is None else image[index] for image, index in zip(projected, indices))
        kept = [image if index is None else image[index] for image, index in zip(features, indices)]
        embeddings = self.multi_modal_projector(torch.cat(kept))
        return embeddings.split([t.shape[0] for t in kept])
