"""HiPrune for vLLM's Qwen3-VL and Qwen3-VL-MoE: the Qwen-style binding (qwen_vl.py) plus deepstack.

Geometry: families.QWEN3_VL, as in the transformers integration (object block round(depth / 2), deep block the
last; 2x2 spatial merge, raster order). vLLM's tower returns each merged token's main features and its deepstack
levels side by side in one row, so gathering the kept rows keeps the deepstack features at the same indices, and
every deepstack layer of the language model sees exactly the kept tokens. A video's slices are items of their own
in the prompt (a timestamp before each): each keeps its count of placeholders, each is selected on its own grid.
"""

from __future__ import annotations

from .. import families
from . import _vllm_api
from .qwen_vl import QwenModelMixin, QwenProcessorMixin
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneQwen3VLMultiModalProcessor(QwenProcessorMixin, Qwen3VLMultiModalProcessor):
    geometry = families.QWEN3_VL


class Qwen3VLStyleMixin(QwenModelMixin):
    geometry = families.QWEN3_VL

    def hiprune_embedding_width(self):
        return self.visual_dim + self.multiscale_dim  # main features, then the deepstack levels

    def hiprune_media(self, input_tokens, mm_features):
        media = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            for offset, h, w, _ in _vllm_api.qwen3_vl_frames(self, input_tokens, feature):
                media.append((offset, 1, h, w, 1.0, feature))
        return media


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class HiPruneQwen3VLForConditionalGeneration(Qwen3VLStyleMixin, Qwen3VLForConditionalGeneration):
    architecture = "Qwen3VLForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen3VLMultiModalProcessor, info=Qwen3VLMoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class HiPruneQwen3VLMoeForConditionalGeneration(Qwen3VLStyleMixin, Qwen3VLMoeForConditionalGeneration):
    architecture = "Qwen3VLMoeForConditionalGeneration"
