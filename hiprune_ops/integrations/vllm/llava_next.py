"""HiPrune for vLLM's LlavaNextForConditionalGeneration (CLIP tower, vision_feature_select_strategy "default").

Geometry: families.LLAVA_NEXT, as in the transformers integration (hf/llava.py LlavaNextAdapter): CLS prefix, no
merge; object layer round(depth * 9 / 24) of the full tower, deep layer the one feeding the projector (the last
vLLM builds). An image is its base tile and its AnyRes tiles; a budget counts over all of them (budget // tiles per
tile, at most a tile's tokens), a ratio applies per tile. Processor: a pruned image gets tiles x kept placeholders.
Encoder: each tile's patches are scored and selected on its own; a pruned image is its base tile's kept tokens, then
the other tiles' kept tokens in raster order of the tiled grid, without unpadding or newline tokens (as
apply_hiprune packs it). An image that keeps every token is packed by vLLM's own code. 1-D positions, recompacted.
HiPrune++ (as apply_hiprune): every tile of a pruned image gets prompt_extra_count(its kept count) extra tokens for
the image's prompt, ranked on the projected features; the image's placeholders are tiles x (kept + extra).
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from .. import families
from ..hf._transformers_api import llava_next_layout
from ..settings import split_over_tiles
from . import _vllm_api
from ._common import (ClipLlavaModelMixin, ProcessorMixin, clip_tower_refusal, keep_counts, prompt_inputs,
                      tile_prompts)
from .settings import HiPruneSettings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


def tile_layout(config, image_size) -> tuple[int, int, int]:
    """(rows, cols, tokens) of an image of (height, width): families.anyres_layout, apply_hiprune's rule."""
    return families.anyres_layout(config, image_size, llava_next_layout())


def kept_per_tile(settings: HiPruneSettings, tiles: int, grid_tokens: int, default_ratio: float) -> int:
    """apply_hiprune's rule (settings.split_over_tiles): a budget splits evenly over the tiles, a ratio applies to
    each."""
    if not settings.enabled or not settings.budget:
        return settings.keep_count(grid_tokens, clamp=True, default_ratio=default_ratio)
    name = "mm_processor_kwargs: hiprune_budget" if settings.from_request else "hiprune: budget"
    return split_over_tiles(settings.budget, tiles, grid_tokens, name)


# Per image, the tokens each of its tiles keeps (a tile's whole grid: unpruned). The image's kept count alone cannot
# say it: a pruned image of many tiles may keep as many tokens as, or more than, vLLM packs unpruned (OneVision
# downscales large tiled grids; a pruned image is not downscaled, as in apply_hiprune).
TILE_KEEP_FIELD = "hiprune_keep_per_tile"


class AnyResProcessorMixin(ProcessorMixin):
    """LLaVA-NeXT-style processors (a base tile and AnyRes tiles): an image keeps tiles x its per-tile count, or all
    its tokens (_full_count: base, unpadded tiles, newlines) when the per-tile count keeps every tile whole; the
    per-tile count goes to the encoder in TILE_KEEP_FIELD. HiPrune++: each tile's extra tokens, tiles x them per
    image."""

    prompt_aware = True

    def _full_count(self, config, image_size) -> int:
        return tile_layout(config, image_size)[2]

    def _image_token_counts(self, processed) -> list[int]:
        if processed.get("pixel_values") is None:
            return []
        config = self.info.get_hf_config()
        return [self._full_count(config, size) for size in processed["image_sizes"]]

    def _kept_counts(self, settings, counts, processed) -> list[int]:
        config = self.info.get_hf_config()
        grid_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        kept, per_tile = [], []
        for size, full in zip(processed["image_sizes"], counts):
            rows, cols, _ = tile_layout(config, size)
            keep = min(grid_tokens, kept_per_tile(settings, rows * cols + 1, grid_tokens, self.geometry.default_ratio))
            kept.append(full if keep == grid_tokens else keep * (rows * cols + 1))
            per_tile.append(keep)
        processed[TILE_KEEP_FIELD] = torch.tensor(per_tile, dtype=torch.int64)
        return kept

    def _extra_counts(self, beta, has_text, kept, counts, processed) -> list[int]:
        config = self.info.get_hf_config()
        grid_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        extras = []
        for size, keep in zip(processed["image_sizes"], processed[TILE_KEEP_FIELD].tolist()):
            rows, cols, _ = tile_layout(config, size)
            extras.append((rows * cols + 1) * ops.prompt_extra_count(keep, grid_tokens, beta, has_text=has_text))
        return extras

    # Override of BaseMultiModalProcessor._get_mm_fields_config; checked: vllm 0.32.0.
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[TILE_KEEP_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


REFUSALS = (clip_tower_refusal("LLaVA-NeXT"),)


class HiPruneLlavaNextMultiModalProcessor(AnyResProcessorMixin, LlavaNextMultiModalProcessor):
    geometry = families.LLAVA_NEXT
    config_refusals = REFUSALS


def tile_keep_counts(kwargs: dict) -> Optional[list[int]]:
    """Pops both kept counts the processor wrote; per image, the tokens each of its tiles keeps, or None."""
    keep_counts(kwargs)  # the image's total: its placeholders, nothing the encoder needs
    return keep_counts(kwargs, TILE_KEEP_FIELD)


class AnyResModelMixin(ClipLlavaModelMixin):
    """LLaVA-NeXT-style models: subclasses define _tile_features(pixels) -> (tiles, patches, C), the tower's features
    before the projector, and _packed(image_size, tile_embeddings) -> vLLM's own packing of an unpruned image."""

    prompt_aware = True

    def hiprune_anyres_images(self, image_input, keep: Optional[list[int]], prompts=None,
                              ) -> Optional[list[torch.Tensor]]:
        """Per image of vLLM's parsed input, its embeddings: its tiles' kept tokens, base tile first, then the
        other tiles' in raster order of the tiled grid; an image that keeps every token as vLLM packs it. None when
        no image is pruned (keep: per image, the tokens each tile keeps; vLLM's own path runs). prompts
        (prompt_inputs, per image): HiPrune++, every tile getting its share of its image's extra tokens."""
        grid = self.hiprune_grid
        if (image_input is None or keep is None or image_input["type"] != "pixel_values"
                or all(k >= grid * grid for k in keep)):
            return None
        if self.hiprune_unsupported is not None:
            raise ValueError(self.hiprune_unsupported)
        layouts = [tile_layout(self.config, size) for size in image_input["image_sizes"]]
        tiles = [rows * cols + 1 for rows, cols, _ in layouts]
        pixels = torch.cat([images[:count] for images, count in zip(image_input["pixel_values"], tiles)])
        features, (object_scores, deep_scores) = self.hiprune_taps.scored(lambda: self._tile_features(pixels))
        per_tile = [k for k, count in zip(keep, tiles) for _ in range(count)]
        projected = self.multi_modal_projector(features)
        indices = self.hiprune_select(object_scores.unbind(0), deep_scores.unbind(0),
                                      [(grid, grid)] * features.shape[0], per_tile,
                                      features=None if prompts is None else list(projected),
                                      prompts=tile_prompts(prompts, tiles, split=True))
        embeddings = projected.split(tiles)
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        indices = [indices[start:start + count] for start, count in zip(starts, tiles)]
        out = []
        for image, size, chosen, (rows, cols, _) in zip(embeddings, image_input["image_sizes"], indices, layouts):
            if chosen[0] is None:  # keeps every token: vLLM's packing, token for token
                out.append(self._packed(size, image))
                continue
            kept = [image[0, chosen[0]]]
            if len(chosen) > 1:
                # Tile t = 1 + r * cols + c; token (y, x) sits at (r * grid + y, c * grid + x) on the tiled grid.
                index = torch.stack(chosen[1:])
                t = torch.arange(index.shape[0])[:, None]
                key = ((t // cols) * grid + index // grid) * (cols * grid) + (t % cols) * grid + index % grid
                tokens = image[1:].gather(1, index[:, :, None].expand(-1, -1, image.shape[-1]))
                kept.append(tokens.flatten(0, 1)[key.flatten().argsort()])
            out.append(torch.cat(kept))
        return out


@MULTIMODAL_REGISTRY.register_processor(HiPruneLlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class HiPruneLlavaNextForConditionalGeneration(AnyResModelMixin, LlavaNextForConditionalGeneration):
    geometry = families.LLAVA_NEXT
    architecture = "LlavaNextForConditionalGeneration"
    config_refusals = REFUSALS

    def embed_multimodal(self, **kwargs):
        keep = tile_keep_counts(kwargs)
        prompts = prompt_inputs(kwargs)
        pruned = self.hiprune_anyres_images(_vllm_api.parse_image_input(self, dict(kwargs)), keep, prompts)
        return super().embed_multimodal(**kwargs) if pruned is None else pruned

    def _tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_next_tile_features(self, pixels)  # CLS already dropped

    def _packed(self, image_size, tile_embeddings: torch.Tensor) -> torch.Tensor:
        return _vllm_api.llava_next_packed(self, image_size, tile_embeddings)
