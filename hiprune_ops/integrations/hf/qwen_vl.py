"""The Qwen-VL pipeline, shared by Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V / 4.5V.

Their towers take packed patches with grid_thw (t, h, w) per image or video, attend within each temporal slice
(an image, or temporal_patch_size video frames: one cu_seqlens segment), and merge each 2x2 unit of patches into
one language-model token. So:
- scores: q and k of the object and deep blocks give each patch's received attention within its slice (packed
  segments, see capture.py), averaged over each merge unit in the tower's order, then put in raster order
  (qwen_positions.merged_raster_scores, with the window index of Qwen2.5-VL's windows; the others run in raster
  order);
- selection: per temporal slice, on its own merged grid (h/2 x w/2), so no buffer crosses a slice boundary. An image
  keeps `budget` tokens (or `ratio` of them), each video slice `video_budget` or `video_ratio` (default: the image
  setting), clamped to the slice;
- the merged features (and extra feature levels: Qwen3-VL's deepstack) are gathered at the same kept indices and
  go in as the model's image / video encoder outputs;
- positions: the full prompt's M-RoPE positions (the model's own get_rope_index), gathered at the kept tokens, so
  kept visual tokens keep their (t, h, w) positions and the text after keeps its own; generated tokens continue
  from the original prompt's last position.
Defaults: object block round(depth / 2) (families may choose otherwise), deep block the last; ratio 0.334.
"""

from __future__ import annotations

import torch

from .. import families
from ..qwen_positions import merged_raster_scores
from ..selection import select_items
from ._transformers_api import set_rope_deltas
from .base import Adapter, EncodedImages

KIND_TYPE = {"image": 1, "video": 2}  # mm_token_type_ids values


class QwenVLAdapter(Adapter):
    media_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    grid_keys = {"image": "image_grid_thw", "video": "video_grid_thw"}
    geometry = families.QWEN2_VL
    one_call = False  # the tower calls a block's attention per segment or window group

    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options)
        self.visual = model.model.visual
        self.resolve_layers(len(self.visual.blocks))

    def geometry_config(self):
        return self.visual.config  # the tower's own vision config

    # -- what a family may change --------------------------------------------------------------------------------
    def run_tower(self, kind: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """The tower's output for one kind; its pooler_output holds the merged tokens in raster order."""
        return self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw)

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The raster index of each merge unit in the order the tower runs them (one after another over the items):
        raster order itself unless the tower reorders (Qwen2.5-VL's windows)."""
        units = int(grid_thw.prod(-1).sum()) // self.merge() ** 2
        return torch.arange(units, device=grid_thw.device)

    def extra_features(self, output) -> list[torch.Tensor]:
        """Further per-token feature levels (T_merged, D) to gather at the kept indices (Qwen3-VL: deepstack)."""
        return []

    def token_types(self, kwargs: dict) -> torch.Tensor:
        """mm_token_type_ids (0 text, 1 image, 2 video): the processor's, or inferred from the placeholder ids."""
        types = kwargs.get("mm_token_type_ids")
        if types is not None:
            return types
        input_ids = kwargs["input_ids"]
        types = torch.zeros_like(input_ids, dtype=torch.int)
        for kind, value in KIND_TYPE.items():
            types[input_ids == getattr(self.model.config, f"{kind}_token_id")] = value
        return types

    # -- the shared part -----------------------------------------------------------------------------------------
    def attention(self, layer):
        return self.visual.blocks[layer - 1].attn

    def encode(self, kwargs: dict) -> dict[str, EncodedImages]:
        encoded = {}
        for kind, key in self.media_keys.items():
            if kwargs.get(key) is None:
                continue
            grid_thw = kwargs.get(self.grid_keys[kind])
            if grid_thw is None:
                raise ValueError(f"hiprune: {key} needs {self.grid_keys[kind]}")
            encoded[kind] = self._encode_kind(kind, kwargs[key], grid_thw)
        return encoded

    def _tower_scores(self, kind, pixel_values, grid_thw):
        output, per_patch = self.capture.scored(lambda: self.run_tower(kind, pixel_values, grid_thw))
        window_index = self.window_index(grid_thw)
        return output, [merged_raster_scores(s, window_index, self.merge() ** 2) for s in per_patch]

    def _encode_kind(self, kind, pixel_values, grid_thw) -> EncodedImages:
        patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != patches:
            raise ValueError(f"hiprune: {self.grid_keys[kind]} describes {patches} patches but "
                             f"{self.media_keys[kind]} holds {pixel_values.shape[0]}")
        output, (obj, deep) = self._tower_scores(kind, pixel_values, grid_thw)
        merged = output.pooler_output
        extras = self.extra_features(output)
        m = self.merge()
        # Every temporal slice is an item on its own merged grid (so no buffer crosses a slice boundary).
        grids, starts, start = [], [], 0
        for t, h, w in grid_thw.tolist():
            for _ in range(t):
                grids.append((h // m, w // m))
                starts.append(start)
                start += (h // m) * (w // m)
        spans = [slice(s, s + gh * gw) for s, (gh, gw) in zip(starts, grids)]
        keeps = [self.keep(gh * gw, kind) for gh, gw in grids]
        indices, roles = select_items([obj[span] for span in spans], [deep[span] for span in spans], grids, keeps,
                                      self.settings, features=[merged[span] for span in spans],
                                      prompts=self.item_prompts(kind, [gh * gw for gh, gw in grids]))
        result = EncodedImages([], [gh * gw for gh, gw in grids], list(indices), list(indices), roles,
                               deepstack=[[] for _ in extras])
        for span, index in zip(spans, indices):
            flat = index + span.start
            result.features.append(merged[flat])
            for level, extra in zip(result.deepstack, extras):
                level.append(extra[flat])
        return result

    def positions(self, kwargs, plan, new, for_generate):
        model = self.model.model
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        full, deltas = model.get_rope_index(kwargs["input_ids"], mm_token_type_ids=self.token_types(kwargs),
                                            image_grid_thw=kwargs.get("image_grid_thw"),
                                            video_grid_thw=kwargs.get("video_grid_thw"),
                                            attention_mask=kwargs.get("attention_mask"), **extra)
        positions = plan.take(full, 0)
        set_rope_deltas(model, deltas + plan.removed.to(deltas.device)[:, None])
        if not for_generate:
            return positions
        # generate() wants the text positions as a 4th leading row, as the class's own position preparation makes.
        mask = new.get("attention_mask")
        if mask is not None:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            text = torch.arange(positions.shape[-1], device=positions.device).expand(positions.shape[1], -1)
        return torch.cat([text[None].to(positions.dtype), positions], dim=0)

