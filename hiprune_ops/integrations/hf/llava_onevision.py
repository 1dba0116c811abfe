"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): a SigLIP tower (no CLS) under LLaVA-NeXT's AnyRes tiles.

Images: a base image and its tiles, as LLaVA-NeXT (llava.py): `budget` counts over the base image and its tiles,
each keeping budget // tiles (at most its own tokens); a pruned image is packed as base tokens, then tile tokens in
raster order over the whole tiled grid, without unpadding, the anyres_max bilinear downscale or newline tokens.
When every tile keeps all its tokens, transformers' own packing is used, token for token. An image of a
multi-image prompt (batch_num_images > 1) is one tile, as the model has it.
Video: every frame runs through the tower, is projected, then pooled bilinearly to ceil(h / 2) x ceil(w / 2) (the
model's apply_pooling: a 2 x 2 mean on even grids, uneven weights on odd ones such as 27 x 27). The frame's patch
scores are pooled by that same interpolation and each frame keeps `video_budget` (or `video_ratio`; default: the
image setting) of its pooled tokens, selected on the pooled grid. The newline token after the whole video stays.
Defaults: object layer round(depth * 9 / 24); deep layer = the layer feeding the projector (vision_feature_layer,
-1: the last); ratio 1/3 of each tile and frame. Positions are recompacted.
"""

from __future__ import annotations

import torch

from .. import families
from ..selection import select_items
from ._transformers_api import llava_next_layout
from .base import EncodedImages
from .llava import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    geometry = families.LLAVA_ONEVISION
    media_keys = {"image": "pixel_values", "video": "pixel_values_videos"}

    def encode(self, kwargs):
        encoded = {}
        if kwargs.get("pixel_values") is not None:
            encoded["image"] = self.encode_images(kwargs)
        if kwargs.get("pixel_values_videos") is not None:
            encoded["video"] = self.encode_videos(kwargs)
        return encoded

    def _checked_options(self, kwargs):
        layer, strategy = self.feature_options(kwargs)
        if strategy != "full" or self.num_prefix != 0:
            raise NotImplementedError("hiprune: LLaVA-OneVision is supported with a tower without CLS token and "
                                      "vision_feature_select_strategy='full'")
        return layer

    def encode_images(self, kwargs) -> EncodedImages:
        # LLaVA-NeXT's tiling helpers: OneVision's modeling file holds identical copies (transformers 5.23.0).
        get_anyres_image_grid_shape, image_size_to_num_patches, _ = llava_next_layout()
        layer = self._checked_options(kwargs)
        model, config = self.model.model, self.model.config
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("hiprune: LLaVA-OneVision images need image_sizes (pass the processor's output unchanged)")
        aspect = kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio
        batch_num_images = kwargs.get("batch_num_images")
        tiled = ([True] * len(image_sizes) if batch_num_images is None
                 else [int(n) == 1 for n in batch_num_images for _ in range(int(n))])
        tiles_per_image = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                                     patch_size=config.vision_config.image_size) if tile else 1
                           for size, tile in zip(image_sizes, tiled)]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:t] for pv, t in zip(pixel_values, tiles_per_image)], dim=0)
        hidden, obj, deep = self._tower_features(pixel_values, layer)
        grid = self.tower.grid
        result = EncodedImages([], [], [])
        start = 0
        for image, tiles in enumerate(tiles_per_image):
            tile_slice = slice(start, start + tiles)
            start += tiles
            projected = self.project(hidden[tile_slice])
            sizes = image_sizes[image:image + 1]
            # The unpruned count, from the model's own packing of one channel (unpad, anyres_max, newlines).
            counted, _ = model.pack_image_features([projected[..., :1]], sizes, model.image_newline[:1], aspect)
            full = counted[0].shape[0]
            keep = self.per_tile(tiles)
            if keep == self.grid_tokens:  # nothing pruned: transformers' packing, token for token
                packed, _ = model.pack_image_features([projected], sizes, model.image_newline, aspect)
                features = packed[0]
                indices = torch.arange(self.grid_tokens, device=hidden.device).expand(tiles, -1)
                roles = torch.full_like(indices, 2, dtype=torch.int8)
            else:
                prompts = self.item_prompts("image", result.full_counts + [full])
                indices, roles = (torch.stack(v) for v in self._select(
                    obj[tile_slice], deep[tile_slice], keep, projected, prompts and [prompts[-1]] * tiles))
                base = projected[0, indices[0]]
                features = base
                if tiles > 1:
                    rows, cols = get_anyres_image_grid_shape(sizes[0], config.image_grid_pinpoints,
                                                             config.vision_config.image_size)
                    # Tile t = 1 + r * cols + c; token (y, x) -> (r * grid + y, c * grid + x) on the tiled grid.
                    t = torch.arange(tiles - 1, device=indices.device)[:, None]
                    y, x = indices[1:] // grid, indices[1:] % grid
                    key = ((t // cols) * grid + y) * (cols * grid) + (t % cols) * grid + x
                    order = key.flatten().argsort()
                    tile_tokens = projected[1:].gather(1, indices[1:, :, None].expand(-1, -1, projected.shape[-1]))
                    features = torch.cat([base, tile_tokens.flatten(0, 1)[order]], dim=0)
            result.features.append(features)
            result.full_counts.append(full)
            result.kept_slots.append(torch.arange(features.shape[0], device=features.device))
            result.indices.append(indices)
            result.roles.append(roles)
        return result

    def encode_videos(self, kwargs) -> EncodedImages:
        """Per video: its frames' kept pooled tokens, frame after frame, then the newline token."""
        layer = self._checked_options(kwargs)
        model = self.model.model
        videos = kwargs["pixel_values_videos"]
        if videos.dim() != 5:
            raise ValueError(f"hiprune: pixel_values_videos must be (videos, frames, channels, height, width), got "
                             f"shape {tuple(videos.shape)}")
        count, frames = videos.shape[:2]
        hidden, obj, deep = self._tower_features(videos.flatten(0, 1), layer)
        pooled = model.apply_pooling(self.project(hidden))  # (videos * frames, ph * pw, D), the model's own
        grid = self.tower.grid
        pooled_h, pooled_w = families.bilinear_pooled_grid(grid, grid)
        tokens = pooled_h * pooled_w
        keep = self.keep(tokens, "video")
        obj, deep = families.bilinear_pool(obj, grid, grid), families.bilinear_pool(deep, grid, grid)
        prompts = self.item_prompts("video", [frames * tokens + 1] * count)
        indices, roles = select_items(obj.unbind(0), deep.unbind(0), [(pooled_h, pooled_w)] * obj.shape[0],
                                      [keep] * obj.shape[0], self.settings, features=pooled,
                                      prompts=prompts and [p for p in prompts for _ in range(frames)])
        result = EncodedImages([], [], [], list(indices), list(roles))
        newline = model.image_newline[None].to(pooled.dtype)
        for video in range(count):
            members = range(video * frames, (video + 1) * frames)
            kept = [pooled[i, indices[i]] for i in members]
            result.features.append(torch.cat(kept + [newline]))
            offsets = [indices[i] + j * tokens for j, i in enumerate(members)]
            result.kept_slots.append(torch.cat(offsets + [torch.tensor([frames * tokens], device=pooled.device)]))
            result.full_counts.append(frames * tokens + 1)
        return result

    def encoder_outputs(self, encoded, new):
        outputs = super().encoder_outputs(encoded, new)
        if "video" in outputs:  # the model flattens (videos, tokens, D): one row holding every video's tokens
            outputs["video"].pooler_output = torch.cat(outputs["video"].pooler_output)[None]
        return outputs
