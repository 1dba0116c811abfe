"""Each model family's geometry, declared once; the transformers binding (hf/) and the vLLM binding (vllm/) read it.

Both frameworks hand a model its transformers config (vLLM's `hf_config` is the same object), so whatever depends
on the config is a function of it here. A family says:
- num_prefix: tokens before the patches in the tower's sequence (a CLS token), left out of the scores;
- merge: one language-model token per merge x merge patches (spatial merge, pixel shuffle, average pool, patch
  merger: `merge_kind`), as a number or a function of the config; the patch scores are averaged the same way;
- window_order: the tower runs its merge units in attention-window order (Qwen2.5-VL), mapped back to raster order;
- object_layer / deep_layer: the default 1-based layers, functions of the tower's depth (and the config);
- default_ratio: kept share when neither budget nor ratio is given;
- kinds: the placeholder kinds it takes ("image", "video"); video: how a video reaches the tower ("slices":
  temporal_patch_size frames per slice, "frames": one grid per frame, "images": frames arrive as images);
- deepstack: extra per-token feature levels gathered at the kept indices (Qwen3-VL);
- sizes_vary: items differ in size, so a budget above an item clamps to it (see settings.py), else it is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .._validation import round_half_even


def scaled_object_layer(depth: int) -> int:
    """The paper's 9th of 24 layers, scaled: round(depth * 9 / 24), never below 1 (CLIP, SigLIP, InternViT)."""
    return max(1, round_half_even(depth * 9 / 24))


def middle_layer(depth: int) -> int:
    """round(depth / 2), never below 1: the Qwen-style and GLM towers' object block."""
    return max(1, round_half_even(depth / 2))


def full_attention_nearest_middle(depth: int, full_attention_blocks) -> int:
    """Qwen2.5-VL's object block: the full-attention block (0-based indices in the config) nearest depth / 2, the
    lower on a tie; the last block when there is none."""
    full = [i + 1 for i in full_attention_blocks] or [depth]
    return min(full, key=lambda layer: (abs(layer - depth / 2), layer))


def projector_layer(feature_layer, depth: int) -> int:
    """1-based layer whose output is hidden_states[feature_layer] (hidden_states[0] is the embeddings); for a list
    of feature layers, the deepest."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(1, max(layer if layer >= 0 else depth + 1 + layer for layer in layers))


def _last(depth: int, config: Any) -> int:
    return depth


def _feeds_projector(depth: int, config: Any) -> int:
    return projector_layer(config.vision_feature_layer, depth)


@dataclass(frozen=True)
class Geometry:
    name: str
    num_prefix: int = 0
    merge: Union[int, Callable[[Any], int]] = 1
    merge_kind: str = "none"
    window_order: bool = False
    object_layer: Callable[[int, Any], int] = lambda depth, config: scaled_object_layer(depth)
    deep_layer: Callable[[int, Any], int] = _last
    default_ratio: float = 1 / 3
    kinds: tuple[str, ...] = ("image",)
    video: Optional[str] = None
    deepstack: bool = False
    sizes_vary: bool = False
    config_scope: str = "model"  # what the functions above take: "model" (the config) or "vision" (vision_config)

    def merge_of(self, config: Any) -> int:
        return self.merge(config) if callable(self.merge) else self.merge

    @property
    def takes_video(self) -> bool:
        return "video" in self.kinds




LLAVA = Geometry("LLaVA-1.5", num_prefix=1, deep_layer=_feeds_projector)
# 640 of 2880 (base + 2x2 tiles of 576); a budget counts over the base image and its tiles.
LLAVA_NEXT = Geometry("LLaVA-NeXT", num_prefix=1, deep_layer=_feeds_projector, default_ratio=2 / 9, sizes_vary=True)


def anyres_layout(config: Any, image_size, layout) -> tuple[int, int, int]:
    """LLaVA-NeXT's AnyRes tiling of an image of (height, width): (rows, cols, tokens), its tile grid besides the
    base tile ((0, 0) without tiles) and its unpruned token count (base tile, unpadded tiles, one newline per row;
    base tile and one newline without tiles). layout: the framework's (get_anyres_image_grid_shape,
    image_size_to_num_patches, unpad_image), transformers' functions (hf/_transformers_api.llava_next_layout)."""
    get_grid_shape, num_tiles, unpad_image = layout
    side = config.vision_config.image_size
    grid = side // config.vision_config.patch_size
    height, width = (int(v) for v in image_size)
    if num_tiles(image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints, patch_size=side) == 1:
        return 0, 0, grid * grid + 1
    rows, cols = get_grid_shape((height, width), config.image_grid_pinpoints, side)
    unpadded = unpad_image(torch.empty(1, rows * grid, cols * grid, device="meta"), (height, width))
    return rows, cols, grid * grid + unpadded.shape[1] * (unpadded.shape[2] + 1)


# Qwen-style towers carry their own vision config (transformers' visual.config, vLLM's hf_config.vision_config).
_QWEN = dict(config_scope="vision", merge=lambda vision_config: vision_config.spatial_merge_size,
             merge_kind="spatial merge", object_layer=lambda depth, config: middle_layer(depth), default_ratio=0.334,
             kinds=("image", "video"), video="slices", sizes_vary=True)
QWEN2_VL = Geometry("Qwen2-VL", **_QWEN)
QWEN2_5_VL = Geometry("Qwen2.5-VL", **dict(
    _QWEN, window_order=True,
    object_layer=lambda depth, vision_config: full_attention_nearest_middle(depth,
                                                                            vision_config.fullatt_block_indexes)))
QWEN3_VL = Geometry("Qwen3-VL", **dict(_QWEN, deepstack=True))
QWEN3_5 = Geometry("Qwen3.5", **_QWEN)
GLM4V = Geometry("GLM-4.1V / 4.5V / 4.6V", **dict(_QWEN, video="frames"))

INTERNVL = Geometry("InternVL 3 / 3.5", num_prefix=1, merge=2, merge_kind="pixel shuffle",
                    deep_layer=_feeds_projector, video="images")
PALIGEMMA = Geometry("PaliGemma")
GEMMA3 = Geometry("Gemma 3", merge=lambda config: (config.vision_config.image_size // config.vision_config.patch_size)
                  // int(config.mm_tokens_per_image ** 0.5), merge_kind="average pool")
IDEFICS3 = Geometry("Idefics3 / SmolVLM", merge=lambda config: config.scale_factor, merge_kind="pixel shuffle")
PIXTRAL = Geometry("LLaVA with a Pixtral tower", deep_layer=_feeds_projector, sizes_vary=True)
MISTRAL3 = Geometry("Mistral 3", merge=lambda config: config.spatial_merge_size, merge_kind="patch merger",
                    deep_layer=_feeds_projector, sizes_vary=True)
# SigLIP tower, no CLS; a budget counts over the base image and its tiles (as LLaVA-NeXT); video frames are pooled
# to ceil(h / 2) x ceil(w / 2) bilinearly (merge_kind: the scores are pooled the same way, hf/llava_onevision.py).
LLAVA_ONEVISION = Geometry("LLaVA-OneVision", deep_layer=_feeds_projector, merge=2, merge_kind="bilinear video pool",
                           kinds=("image", "video"), video="frames", sizes_vary=True)
# Images of varying soft-token counts, each padded to a fixed patch budget; the pooler averages k x k patches by
# their positions (vision_config.pooling_kernel_size); video frames are images of their own kind.
GEMMA4 = Geometry("Gemma 4", merge=lambda config: config.vision_config.pooling_kernel_size,
                  merge_kind="average pool by position", kinds=("image", "video"), video="frames", sizes_vary=True)


def position_grids(positions: torch.Tensor, k: int, key: str) -> list[tuple[int, int]]:
    """Gemma 4: each row's patch grid (H, W) from its (x, y) patch positions ((-1, -1) at padding); a row must fill
    its grid, of whole k x k groups (the pooler's soft tokens: (H / k) * (W / k))."""
    grids = []
    for row in positions:
        real = row[(row != -1).all(-1)]
        if real.numel() == 0:
            raise ValueError(f"hiprune: a row of {key} has no real patch")
        w, h = (int(v) + 1 for v in real.max(0).values)
        if real.shape[0] != h * w or h % k or w % k:
            raise ValueError(f"hiprune: a row of {key} holds {real.shape[0]} real patches, not a full "
                             f"{h}x{w} grid of {k}x{k} groups (pass the processor's output unchanged)")
        grids.append((h, w))
    return grids


def raster_by_position(scores: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Gemma 4: one row's real-patch scores put in raster order on its (H, W) grid by their (x, y) positions."""
    real = (positions != -1).all(-1)
    x, y = positions[real].unbind(-1)
    out = torch.empty(grid[0] * grid[1], dtype=scores.dtype, device=scores.device)
    out[y * grid[1] + x] = scores[real]
    return out
# Bare CLIP / SigLIP towers (encode, HiPruneVisionTower): the last layer is the deep one.
BARE_TOWER = Geometry("bare ViT tower")


def bilinear_pooled_grid(grid_h: int, grid_w: int) -> tuple[int, int]:
    """The pooled grid bilinear_pool gives: ceil(h / 2) x ceil(w / 2)."""
    return math.ceil(grid_h / 2), math.ceil(grid_w / 2)


def bilinear_pool(scores: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """LLaVA-OneVision video frames: (B, grid_h * grid_w) patch scores -> (B, ceil(h / 2) * ceil(w / 2)), the
    interpolation the model's apply_pooling runs on the features, so every pooled token scores what it is made of,
    with the same weights."""
    pooled = torch.nn.functional.interpolate(scores.reshape(-1, 1, grid_h, grid_w).float(),
                                             size=list(bilinear_pooled_grid(grid_h, grid_w)), mode="bilinear")
    return pooled.flatten(1)

