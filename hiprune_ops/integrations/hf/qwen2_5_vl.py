"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): the Qwen-VL pipeline (qwen_vl.py) with window reordering.

The tower runs its patches in window order (2x2 merge units grouped by attention window); scores are mapped back
to raster order with the window index the tower gathers its patches with. Object block: the full-attention block
nearest depth / 2 (the 16th of 32; the 2nd of a 4-block test tower with fullatt_block_indexes [1, 3]); deep block:
the last.
"""

from __future__ import annotations

from .qwen_vl import QwenVLAdapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def default_object_layer(self) -> int:
        depth = len(self.visual.blocks)
        full = [i + 1 for i in self.visual.fullatt_block_indexes] or [depth]
        return min(full, key=lambda layer: (abs(layer - depth / 2), layer))

    def window_index(self, grid_thw):
        from transformers.vision_utils import get_vision_window_index

        visual = self.visual
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return window_index
