"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration).

Defaults (spec table): object block = the full-attention block nearest to depth / 2 (the 16th of 32, a
full-attention block; the 2nd of a 4-block test tower with fullatt_block_indexes [1, 3]); deep block = the last;
alpha 0.1; ratio 0.334 of each image's merged tokens (`budget` is a per-image count, clamped to the image).
Scores: q and k of the chosen blocks give each patch's received attention within its image (packed segments),
in the tower's window order; they are averaged over each 2x2 merge unit and mapped back to raster order, the order
of the merged tokens. Kept tokens keep their original M-RoPE positions; generated tokens continue from the
original prompt's last position. Videos are not pruned.
"""

from __future__ import annotations

import torch

from .. import ops
from . import capture
from .base import Adapter, EncodedImages
from .qwen_positions import merged_raster_scores
from .towers import resolve_budget, resolve_layer


class Qwen2_5_VLAdapter(Adapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    default_ratio = 0.334

    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official)
        visual = model.model.visual
        self.visual = visual
        depth = len(visual.blocks)
        full = [i + 1 for i in visual.fullatt_block_indexes] or [depth]
        default_object = min(full, key=lambda layer: (abs(layer - depth / 2), layer))
        self.object_layer = resolve_layer(object_layer, depth, default_object, "object_layer")
        self.deep_layer = resolve_layer(deep_layer, depth, depth, "deep_layer")
        resolve_budget(budget, ratio, 10 ** 9, self.default_ratio)  # validates now; applied per image later
        self._marked = []

    def attach(self):
        for layer in sorted({self.object_layer, self.deep_layer}):
            module = self.visual.blocks[layer - 1].attn
            if capture.slot_of(module) is None:
                capture.attach(module, 0)
                self._marked.append(layer)

    def detach(self):
        for layer in self._marked:
            capture.detach(self.visual.blocks[layer - 1].attn)
        self._marked = []

    def _raster_scores(self, scores, window_index):
        return merged_raster_scores(scores, window_index, self.visual.spatial_merge_unit)

    def encode_images(self, kwargs) -> EncodedImages:
        from transformers.vision_utils import get_vision_window_index

        visual = self.visual
        grid_thw = kwargs["image_grid_thw"]
        slots = {layer: capture.slot_of(visual.blocks[layer - 1].attn) for layer in (self.object_layer,
                                                                                      self.deep_layer)}
        for slot in slots.values():
            slot.reset()
        output = visual(kwargs["pixel_values"].type(visual.dtype), grid_thw=grid_thw)
        merged = output.pooler_output
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        per_layer = []
        for layer in (self.object_layer, self.deep_layer):
            recorded = slots[layer].scores
            if not recorded:
                raise RuntimeError(f"hiprune: block {layer} of the vision tower recorded no attention call")
            per_layer.append(self._raster_scores(torch.cat([s.reshape(-1) for s in recorded]), window_index))
        for slot in slots.values():
            slot.reset()
        m = visual.spatial_merge_size
        result = EncodedImages([], [], [])
        start = 0
        for t, h, w in grid_thw.tolist():
            gh, gw = t * (h // m), w // m
            n = gh * gw
            span = slice(start, start + n)
            start += n
            keep = resolve_budget(self.budget, self.ratio, n, self.default_ratio, clamp=True)
            indices, roles = ops.select_with_roles(per_layer[0][None, span], per_layer[1][None, span], keep, gh, gw,
                                                   self.alpha, 0, self.neighborhood, self.official)
            result.features.append(merged[span][indices[0]])
            result.full_counts.append(n)
            result.kept_slots.append(indices[0])
            result.indices.append(indices[0])
            result.roles.append(roles[0])
        return result

    def positions(self, kwargs, plan, images, new, for_generate):
        model = self.model.model
        input_ids = kwargs["input_ids"]
        token_types = kwargs.get("mm_token_type_ids")
        if token_types is None:
            token_types = (input_ids == self.model.config.image_token_id).int()
            token_types[input_ids == self.model.config.video_token_id] = 2
        full, deltas = model.get_rope_index(input_ids, mm_token_type_ids=token_types,
                                            image_grid_thw=kwargs.get("image_grid_thw"),
                                            video_grid_thw=kwargs.get("video_grid_thw"),
                                            second_per_grid_ts=kwargs.get("second_per_grid_ts"),
                                            attention_mask=kwargs.get("attention_mask"))
        positions = plan.take(full, 0)
        model.rope_deltas = deltas + plan.removed.to(deltas.device)[:, None]
        if not for_generate:
            return positions
        mask = new.get("attention_mask")
        if mask is not None:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            text = torch.arange(positions.shape[-1], device=positions.device).expand(positions.shape[1], -1)
        return torch.cat([text[None].to(positions.dtype), positions], dim=0)
