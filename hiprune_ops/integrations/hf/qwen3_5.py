"""Qwen3.5 (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration): the Qwen-VL pipeline as it is.

A Qwen3-VL-style tower without deepstack and without windows; its video placeholders come one run per temporal
slice (timestamps between them), which the per-slice pipeline handles as is. Object block: round(depth / 2);
deep block: the last.
"""

from __future__ import annotations

from .. import families
from .qwen_vl import QwenVLAdapter


class Qwen3_5Adapter(QwenVLAdapter):
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    geometry = families.QWEN3_5
