"""LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration).

Defaults (spec table): object layer 9 of 24, scaled as round(depth * 9 / 24) for shallower towers; deep layer = the
layer whose output feeds the projector (vision_feature_layer -2 -> the 23rd of 24; for a list, the deepest listed);
alpha 0.1; budget 192 of 576 (ratio 1/3) for LLaVA-1.5 and 640 of 2880 (ratio 2/9 of every tile) for LLaVA-NeXT.
Positions of the kept tokens are recompacted (the prompt simply gets shorter).

LLaVA-NeXT: `budget` counts over the base image and its tiles; each tile keeps budget // tiles (at most all of its
tokens). Like the authors' release, a pruned image is packed as base tokens, then tile tokens in raster order over
the whole tiled grid, without unpadding or row-newline tokens, so the language model sees exactly the kept tokens.
When every tile keeps all its tokens nothing is pruned and transformers' own packing (unpad + newlines) is used,
so the outputs equal the unpatched model's.
"""

from __future__ import annotations

import torch

from .. import families
from ..selection import select_items
from ..settings import split_over_tiles
from ..towers import ViTTower
from ._transformers_api import llava_next_layout
from .base import Adapter, EncodedImages


class LlavaAdapter(Adapter):
    model_classes = ("LlavaForConditionalGeneration",)
    geometry = families.LLAVA

    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official, **options)
        self.tower = ViTTower(model.model.vision_tower)
        self.resolve_layers(self.tower.depth)
        self.grid_tokens = self.tower.grid * self.tower.grid  # patch tokens of one image or tile
        self.per_image = self.keep(self.grid_tokens)

    @property
    def num_prefix(self) -> int:
        return self.tower.num_prefix  # a SigLIP tower under LLaVA has none

    def project(self, kept: torch.Tensor) -> torch.Tensor:
        """(images, tokens, C) kept tower features -> the language model's embedding space."""
        return self.model.model.multi_modal_projector(kept)

    def attention(self, layer):
        return self.tower.attention(layer)

    def _tower_features(self, pixel_values, layer):
        layers = [layer] if isinstance(layer, int) else list(layer)
        _, kept, obj, deep = self.tower.run(pixel_values, self.object_layer, self.deep_layer, layers)
        hidden = [kept[i] for i in layers]
        return (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)), obj, deep

    def _select(self, obj, deep, budget, features=None, prompts=None):
        """(indices, roles) per image (or tile): the one selection step; HiPrune++ given every token's features
        (images, tokens, D) and the prompts."""
        grid, count = self.tower.grid, obj.shape[0]
        return select_items(obj.unbind(0), deep.unbind(0), [(grid, grid)] * count, [budget] * count, self.settings,
                            features=features, prompts=prompts)

    def encode_images(self, kwargs) -> EncodedImages:
        if kwargs.get("image_sizes") is not None:
            raise NotImplementedError("hiprune: LLaVA with image_sizes (variable-resolution towers) is not supported")
        layer, strategy = self.feature_options(kwargs)
        prefix = self.num_prefix
        if strategy == "default" and prefix != 1:
            raise NotImplementedError("hiprune: vision_feature_select_strategy='default' drops a CLS token this "
                                      "tower does not have")
        hidden, obj, deep = self._tower_features(kwargs["pixel_values"], layer)
        patches = hidden[:, prefix:]
        keep_prefix = strategy == "full" and prefix > 0
        full = self.grid_tokens + (prefix if keep_prefix else 0)
        prompts = self.item_prompts("image", [full] * hidden.shape[0])
        # HiPrune++ ranks every patch as the language model would receive it (the projector is token-wise).
        indices, roles = self._select(obj, deep, self.per_image, None if prompts is None else self.project(patches),
                                      prompts)
        slots = [torch.cat([torch.arange(prefix, device=index.device), index + prefix]) if keep_prefix else index
                 for index in indices]
        kept = torch.cat([rows[slot] for rows, slot in zip(hidden if keep_prefix else patches, slots)])
        features = self.project(kept).split([slot.shape[0] for slot in slots])
        return EncodedImages(list(features), [full] * len(features), slots, list(indices), list(roles))


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    geometry = families.LLAVA_NEXT

    def per_tile(self, tiles: int) -> int:
        """A budget counts over the base image and its tiles: each keeps budget // tiles, at most its own tokens."""
        if self.budget is None or self.budget == 0:
            return self.keep(self.grid_tokens)
        return split_over_tiles(self.budget, tiles, self.grid_tokens)

    def encode_images(self, kwargs) -> EncodedImages:
        layout = llava_next_layout()
        layer, strategy = self.feature_options(kwargs)
        if strategy != "default" or self.num_prefix != 1:
            raise NotImplementedError("hiprune: LLaVA-NeXT is supported with a CLS tower and "
                                      "vision_feature_select_strategy='default'")
        model, config = self.model.model, self.model.config
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        layouts = [families.anyres_layout(config, size, layout) for size in image_sizes]
        tiles_per_image = [rows * cols + 1 for rows, cols, _ in layouts]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:t] for pv, t in zip(pixel_values, tiles_per_image)], dim=0)
        hidden, obj, deep = self._tower_features(pixel_values, layer)
        patches = hidden[:, 1:]
        grid = self.tower.grid
        prompts = self.item_prompts("image", [full for _, _, full in layouts])
        result = EncodedImages([], [], [])
        start = 0
        for image, tiles in enumerate(tiles_per_image):
            tile_slice = slice(start, start + tiles)
            start += tiles
            projected = self.project(patches[tile_slice])
            rows, cols, full = layouts[image]
            keep = self.per_tile(tiles)
            if keep == self.grid_tokens:  # nothing pruned: transformers' packing, token for token
                packed, _ = model.pack_image_features([projected], image_sizes[image:image + 1], strategy,
                                                      image_newline=model.image_newline)
                features = packed[0]
                indices = torch.arange(self.grid_tokens, device=hidden.device).expand(tiles, -1)
                roles = torch.full_like(indices, 2, dtype=torch.int8)
            else:
                indices, roles = (torch.stack(v) for v in self._select(
                    obj[tile_slice], deep[tile_slice], keep, projected, prompts and [prompts[image]] * tiles))
                base = projected[0, indices[0]]
                if tiles > 1:
                    # Tile t = 1 + r * cols + c; token (y, x) -> (r * grid + y, c * grid + x) on the tiled grid.
                    t = torch.arange(tiles - 1, device=indices.device)[:, None]
                    y, x = indices[1:] // grid, indices[1:] % grid
                    key = ((t // cols) * grid + y) * (cols * grid) + (t % cols) * grid + x
                    order = key.flatten().argsort()
                    tile_tokens = projected[1:].gather(1, indices[1:, :, None].expand(-1, -1, projected.shape[-1]))
                    features = torch.cat([base, tile_tokens.flatten(0, 1)[order]], dim=0)
                else:
                    features = base
            result.features.append(features)
            result.full_counts.append(full)
            result.kept_slots.append(torch.arange(features.shape[0], device=features.device))
            result.indices.append(indices)
            result.roles.append(roles)
        return result
