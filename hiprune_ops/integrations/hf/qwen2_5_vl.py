"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): the Qwen-VL pipeline (qwen_vl.py) with window reordering.

The tower runs its patches in window order (2x2 merge units grouped by attention window); scores are mapped back
to raster order with the window index the tower gathers its patches with. Object block: the full-attention block
nearest depth / 2 (the 16th of 32; the 2nd of a 4-block test tower with fullatt_block_indexes [1, 3]); deep block:
the last.
"""

from __future__ import annotations

from .. import families
from ._transformers_api import qwen2_5_vl_window_index
from .qwen_vl import QwenVLAdapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    geometry = families.QWEN2_5_VL  # object block: the full-attention block nearest depth / 2

    def window_index(self, grid_thw):
        return qwen2_5_vl_window_index(grid_thw, self.visual)
