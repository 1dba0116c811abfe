"""HiPrune for vLLM's LlavaOnevisionForConditionalGeneration (SigLIP tower, vision_feature_select_strategy "full";
images; video frames pass through whole).

Geometry: families.LLAVA_ONEVISION, as in the transformers integration (hf/llava_onevision.py): LLaVA-NeXT's AnyRes
tiles (llava_next.py) under a SigLIP tower without CLS; object layer round(depth * 9 / 24), deep layer the one
feeding the projector. A budget counts over the base tile and its tiles (budget // tiles per tile, at most a tile's
tokens), a ratio applies per tile. Processor: a pruned image gets tiles x kept placeholders; an unpruned one vLLM's
count (base, unpadded tiles downscaled past anyres_max, a newline per row). Encoder: each tile selected on its own;
a pruned image is its base tile's kept tokens, then the other tiles' in raster order of the tiled grid, without
unpadding, downscale or newlines (as apply_hiprune packs it); an image that keeps every token is packed by vLLM's
own code. vLLM treats every image of a multi-image prompt as AnyRes tiles, and so does this binding. 1-D positions,
recompacted.
"""

from __future__ import annotations

import torch

from .. import families
from . import _vllm_api
from ._common import StashedKeepModelMixin
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


class HiPruneLlavaOnevisionMultiModalProcessor(AnyResProcessorMixin, LlavaOnevisionMultiModalProcessor):
    geometry = families.LLAVA_ONEVISION

    def _full_count(self, config, image_size) -> int:
        height, width = (int(v) for v in image_size)
        return self.info.get_num_image_tokens(image_width=width, image_height=height)


@MULTIMODAL_REGISTRY.register_processor(HiPruneLlavaOnevisionMultiModalProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class HiPruneLlavaOnevisionForConditionalGeneration(AnyResModelMixin, StashedKeepModelMixin,
                                                    LlavaOnevisionForConditionalGeneration):
    geometry = families.LLAVA_ONEVISION
    architecture = "LlavaOnevisionForConditionalGeneration"
    family_label = "LLaVA-OneVision"

    def hiprune_tower_unsupported(self, config):
        return siglip_tower_unsupported(config)

    def hiprune_take_keep(self, kwargs: dict):
        return tile_keep_counts(kwargs)

    # Override of LlavaOnevisionForConditionalGeneration._process_image_input (vLLM's images of one
    # embed_multimodal call -> per image its embeddings; its videos go their own way); checked: vllm 0.32.0.
    def _process_image_input(self, image_input):
        pruned = self.hiprune_anyres_images(image_input, self._hiprune_keep)
        return super()._process_image_input(image_input) if pruned is None else pruned

    def _tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_next_tile_features(self, pixels)  # strategy "full": SigLIP has no CLS to drop

    def _packed(self, image_size, tile_embeddings: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_onevision_packed(self, image_size, tile_embeddings)
