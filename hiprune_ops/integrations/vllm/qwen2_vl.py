"""HiPrune for vLLM's Qwen2VLForConditionalGeneration: the Qwen-style binding (qwen_vl.py) as it is.

Geometry: families.QWEN2_VL, as in the transformers integration (object block round(depth / 2), deep block the last;
2x2 spatial merge). Every block attends within an image in raster order of its merge units: no reordering.
"""

from __future__ import annotations

from .. import families
from .qwen_vl import QwenModelMixin, QwenProcessorMixin
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneQwen2VLMultiModalProcessor(QwenProcessorMixin, Qwen2VLMultiModalProcessor):
    geometry = families.QWEN2_VL


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class HiPruneQwen2VLForConditionalGeneration(QwenModelMixin, Qwen2VLForConditionalGeneration):
    geometry = families.QWEN2_VL
    architecture = "Qwen2VLForConditionalGeneration"
