"""HiPrune for vLLM's Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's binding (qwen3_vl.py) on their classes.

Geometry: families.QWEN3_5 (a Qwen3-VL-style tower without deepstack; object block round(depth / 2), deep block the
last; 2x2 spatial merge, raster order). vLLM's Qwen3.5 classes are Qwen3-VL's with a hybrid language model.
"""

from __future__ import annotations

from .. import families
from .qwen3_vl import HiPruneQwen3VLMultiModalProcessor, Qwen3VLStyleMixin
from vllm.model_executor.models.qwen3_5 import (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
                                                Qwen3_5MoeProcessingInfo, Qwen3_5ProcessingInfo)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneQwen3_5MultiModalProcessor(HiPruneQwen3VLMultiModalProcessor):
    geometry = families.QWEN3_5


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen3_5MultiModalProcessor, info=Qwen3_5ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class HiPruneQwen3_5ForConditionalGeneration(Qwen3VLStyleMixin, Qwen3_5ForConditionalGeneration):
    geometry = families.QWEN3_5
    architecture = "Qwen3_5ForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen3_5MultiModalProcessor, info=Qwen3_5MoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class HiPruneQwen3_5MoeForConditionalGeneration(Qwen3VLStyleMixin, Qwen3_5MoeForConditionalGeneration):
    geometry = families.QWEN3_5
    architecture = "Qwen3_5MoeForConditionalGeneration"
