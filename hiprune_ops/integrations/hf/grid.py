"""Families whose tower sees fixed-size tiles and whose language-model token is a k x k group of patches.

InternVL 3/3.5 (pixel_shuffle 0.5: k = 2), Gemma 3 (4 x 4 average pool: k = 4), PaliGemma (no pooling: k = 1).
Every tile (an image, a tile or thumbnail of an image, a video frame) is one row of pixel_values and owns the next
run of (grid / k)^2 placeholders, in order. Each tile is its own selection:
- the object and deep scores of its patches (B, N) are averaged over each k x k group, exactly as the features are
  (avg_pool2d with kernel and stride k), and the selection runs on the pooled (grid / k)^2 grid;
- the model's own get_image_features (tower, pooling or pixel shuffle, projector) gives every token, and the kept
  ones are gathered; so at full budget the language model gets exactly what it gets unpatched.
`budget` counts kept tokens per tile; the language model's 1-D positions are recompacted (the prompt is shorter).
A family declares: its model classes, the tower's attention modules, its prefix, the patch grid, k, the layer that
feeds the projector, and how to call get_image_features.
"""

from __future__ import annotations

import torch

from ... import ops
from .. import capture
from ..towers import default_object_layer, resolve_budget, resolve_layer
from .base import Adapter, EncodedImages


def projector_layer(feature_layer, depth: int) -> int:
    """1-based layer whose output is hidden_states[feature_layer] (hidden_states[0] is the embeddings)."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(1, max(layer if layer >= 0 else depth + 1 + layer for layer in layers))


def pool_scores(scores: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """(B, grid_h * grid_w) patch scores -> (B, grid_h / k * grid_w / k): the mean of each k x k group, raster."""
    if k == 1:
        return scores
    pooled = torch.nn.functional.avg_pool2d(scores.reshape(-1, 1, grid_h, grid_w), k, k)
    return pooled.flatten(1)


class PooledGridAdapter(Adapter):
    default_ratio = 1 / 3
    num_prefix = 0

    # -- what a family declares --------------------------------------------------------------------------------
    def attention_modules(self) -> list[torch.nn.Module]:
        """The tower's attention modules, first layer first."""
        raise NotImplementedError

    def patch_grid(self) -> tuple[int, int]:
        raise NotImplementedError

    def pool_size(self) -> int:
        raise NotImplementedError

    def default_deep_layer(self, depth: int) -> int:
        return depth

    def image_features(self, kwargs: dict) -> torch.Tensor:
        """(tiles, tokens, D) projected features of every token, from the model's own get_image_features."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------------
    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official):
        super().__init__(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official)
        self.attentions = self.attention_modules()
        depth = len(self.attentions)
        self.object_layer = resolve_layer(object_layer, depth, default_object_layer(depth), "object_layer")
        self.deep_layer = resolve_layer(deep_layer, depth, self.default_deep_layer(depth), "deep_layer")
        self.grid_h, self.grid_w = self.patch_grid()
        k = self.pool_size()
        self.pooled_h, self.pooled_w = self.grid_h // k, self.grid_w // k
        self.n = self.pooled_h * self.pooled_w
        self.per_tile = resolve_budget(budget, ratio, self.n, self.default_ratio)
        self._marked: list[int] = []

    def attach(self):
        for layer in sorted({self.object_layer, self.deep_layer}):
            if capture.slot_of(self.attentions[layer - 1]) is None:
                capture.attach(self.attentions[layer - 1], self.num_prefix)
                self._marked.append(layer)

    def detach(self):
        for layer in self._marked:
            capture.detach(self.attentions[layer - 1])
        self._marked = []

    def _scores(self, layer: int) -> torch.Tensor:
        recorded = capture.slot_of(self.attentions[layer - 1]).scores
        if len(recorded) != 1:
            raise RuntimeError(f"hiprune: layer {layer} of the vision tower recorded {len(recorded)} attention calls, "
                               "expected 1 (was the attention implementation changed after patching?)")
        scores = recorded[0]
        if scores.dim() != 2 or scores.shape[1] != self.grid_h * self.grid_w:
            raise ValueError(f"hiprune: the tower produced {tuple(scores.shape)} patch scores, not a "
                             f"{self.grid_h}x{self.grid_w} grid per tile (pixel_values must have the configured "
                             "image_size)")
        return pool_scores(scores, self.grid_h, self.grid_w, self.pool_size())

    def encode_images(self, kwargs) -> EncodedImages:
        layers = (self.object_layer, self.deep_layer)
        for layer in layers:
            capture.slot_of(self.attentions[layer - 1]).reset()
        try:
            features = self.image_features(kwargs)
            obj, deep = (self._scores(layer) for layer in layers)
        finally:
            for layer in layers:
                capture.slot_of(self.attentions[layer - 1]).reset()
        indices, roles = ops.select_with_roles(obj, deep, self.per_tile, self.pooled_h, self.pooled_w, self.alpha, 0,
                                               self.neighborhood, self.official)
        kept = features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        tiles = kept.shape[0]
        return EncodedImages(list(kept.unbind(0)), [self.n] * tiles, list(indices.unbind(0)),
                             list(indices.unbind(0)), list(roles.unbind(0)))

    def prepare(self, kwargs, for_generate):
        prepared = super().prepare(kwargs, for_generate)
        if prepared is not None:  # these models take one (tokens, D) tensor, not a tuple per image
            image = prepared[0]["mm_encoder_outputs"]["image"]
            image.pooler_output = torch.cat(image.pooler_output)
        return prepared
