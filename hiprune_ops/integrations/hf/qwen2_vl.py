"""Qwen2-VL (Qwen2VLForConditionalGeneration): the Qwen-VL pipeline (qwen_vl.py) as it is.

Every block attends within a temporal slice in raster order (no windows), so no reordering. Object block: the
middle one (round(depth / 2): the 16th of 32); deep block: the last.
"""

from __future__ import annotations

from .. import families
from .qwen_vl import QwenVLAdapter


class Qwen2VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen2VLForConditionalGeneration",)
    geometry = families.QWEN2_VL
