"""HiPrune for vLLM's Qwen2_5_VLForConditionalGeneration: the Qwen-style binding (qwen_vl.py) with window order.

Geometry: families.QWEN2_5_VL, as in the transformers integration (object block = the full-attention block nearest
to depth / 2, deep block = the last; 2x2 spatial merge). The tower runs its merge units in window order; the scores
go back to raster order with the tower's own window index.
"""

from __future__ import annotations

from .. import families
from . import _vllm_api
from .qwen_vl import QwenModelMixin, QwenProcessorMixin
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneQwen2_5_VLMultiModalProcessor(QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    geometry = families.QWEN2_5_VL


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class HiPruneQwen2_5_VLForConditionalGeneration(QwenModelMixin, Qwen2_5_VLForConditionalGeneration):
    geometry = families.QWEN2_5_VL
    architecture = "Qwen2_5_VLForConditionalGeneration"

    def window_index(self, t, h, w):
        return _vllm_api.qwen_window_index(self.visual, t, h, w)
