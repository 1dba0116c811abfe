"""HiPrune for vLLM's LlavaForConditionalGeneration (CLIP tower, vision_feature_select_strategy "default").

Processor: each image gets its kept count of placeholders. Encoder: the object and deep layers' q and k are scored
in vLLM's CLIP attention (CLS row included, CLS column dropped), `select` picks the kept patches, and only they go
through the projector. The prompt is simply shorter: positions of the kept tokens are recompacted, as in the
authors' release. Defaults: object layer round(depth * 9 / 24) of the full tower, deep layer = the last layer vLLM
builds (the one whose output feeds the projector).
"""

from __future__ import annotations

import torch

from ... import ops
from ..towers import default_object_layer, resolve_layer
from ._common import ProcessorMixin, TowerTaps, keep_counts, kept_count_of, prepare_vllm_config, tp_all_reduce
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneLlavaMultiModalProcessor(ProcessorMixin, LlavaMultiModalProcessor):
    def _image_token_counts(self, processed) -> list[int]:
        pixel_values = processed.get("pixel_values")
        if pixel_values is None:
            return []
        size = self.info.get_image_size_with_most_features()  # LLaVA-1.5 resizes every image to the tower's size
        n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
        return [n] * len(pixel_values)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        original = updates[0].replacement
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int):
            kept = kept_count_of(out_mm_kwargs, item_idx)
            return original(item_idx) if kept is None else [image_token_id] * kept

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _build_processor(info, dummy_inputs):
    if not isinstance(info, LlavaProcessingInfo):
        raise NotImplementedError(f"hiprune: {type(info).__name__} (Pixtral-style LLaVA) is not supported")
    return HiPruneLlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class HiPruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = prepare_vllm_config(vllm_config, "LlavaForConditionalGeneration")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hiprune_settings = settings
        config = self.config
        if config.vision_config.model_type != "clip_vision_model":
            raise NotImplementedError(f"hiprune: LLaVA with a {config.vision_config.model_type} tower is not "
                                      "supported (CLIP only)")
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError("hiprune: LLaVA is supported with vision_feature_select_strategy='default' "
                                      "and one vision_feature_layer")
        layers = self.vision_tower.vision_model.encoder.layers
        built = len(layers)
        self.hiprune_object_layer = resolve_layer(
            settings.object_layer, built, min(built, default_object_layer(config.vision_config.num_hidden_layers)),
            "object_layer")
        self.hiprune_deep_layer = resolve_layer(settings.deep_layer, built, built, "deep_layer")
        grid = config.vision_config.image_size // config.vision_config.patch_size
        self.hiprune_grid = grid
        attention = [layers[i - 1].self_attn for i in (self.hiprune_object_layer, self.hiprune_deep_layer)]
        self.hiprune_taps = TowerTaps([a.attn for a in attention], config.vision_config.num_attention_heads,
                                      tp_all_reduce(attention[0]), num_prefix=1)
        self.hiprune_last: list = []  # per image of the latest pruned encoder call: kept indices, None if all kept

    def embed_multimodal(self, **kwargs):
        keep = keep_counts(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        n = self.hiprune_grid ** 2
        if keep is None or image_input["type"] != "pixel_values" or all(k >= n for k in keep):
            return self._process_image_input(image_input)
        self.hiprune_taps.arm()
        try:
            features = self._process_image_pixels(image_input)  # (B, N, C): CLS already dropped
            object_scores, deep_scores = self.hiprune_taps.take()
        finally:
            self.hiprune_taps.disarm()
        if len(keep) != features.shape[0]:
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {features.shape[0]} images")
        kept, self.hiprune_last = [], []
        s = self.hiprune_settings
        for b, count in enumerate(keep):
            if count >= n:
                kept.append(features[b])
                self.hiprune_last.append(None)
                continue
            indices = ops.select(object_scores[b:b + 1], deep_scores[b:b + 1], count, self.hiprune_grid,
                                 self.hiprune_grid, s.alpha, 0, s.neighborhood, s.official)
            kept.append(features[b, indices[0]])
            self.hiprune_last.append(indices[0])
        embeddings = self.multi_modal_projector(torch.cat(kept))
        return embeddings.split([t.shape[0] for t in kept])
