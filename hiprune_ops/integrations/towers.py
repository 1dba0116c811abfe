"""Bare ViT towers (CLIPVisionModel, SiglipVisionModel): layer choice, scoring run, and `encode`.

Layers are numbered from 1 as in the paper ("the 9th layer"); negative numbers count from the end (-1 = last).
Defaults scale with depth: object layer = round(depth * 9 / 24) (the 9th of CLIP-L's 24, the 2nd of a 4-layer
test tower, never below 1); deep layer = the last layer for a bare tower (integrations pick the layer that feeds
their projector instead).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ops
from .._validation import round_half_even
from . import capture


class EncodeOutput(NamedTuple):
    """Kept patch features (B, budget, C), their indices into the grid (B, budget) and roles (B, budget) int8."""
    features: torch.Tensor
    indices: torch.Tensor
    roles: torch.Tensor


TOWER_CLASSES = ("CLIPVisionModel", "SiglipVisionModel")


def resolve_layer(layer: Optional[int], depth: int, default: int, name: str) -> int:
    """1-based layer number (negative counts from the end) -> 1-based layer number, validated."""
    if layer is None:
        return default
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name} must be an int (1-based layer number), got {type(layer).__name__}")
    if layer < 0:
        layer = depth + 1 + layer
    if not 1 <= layer <= depth:
        raise ValueError(f"{name} must be in [1, {depth}] (or [-{depth}, -1]) for this {depth}-layer tower, "
                         f"got {layer}")
    return layer


def default_object_layer(depth: int) -> int:
    return max(1, round_half_even(depth * 9 / 24))


def projector_layer(feature_layer, depth: int) -> int:
    """1-based layer whose output is hidden_states[feature_layer] (hidden_states[0] is the embeddings); for a list
    of feature layers, the deepest."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(1, max(layer if layer >= 0 else depth + 1 + layer for layer in layers))


def resolve_budget(budget: Optional[int], ratio: Optional[float], n: int, default_ratio: float,
                   clamp: bool = False, names: tuple[str, str] = ("budget", "ratio")) -> int:
    """Tokens to keep out of n: budget, or round_half_even(ratio * n), or the model's default ratio.

    names: what the caller calls budget and ratio, for the error messages (e.g. video_budget, video_ratio)."""
    budget_name, ratio_name = names
    if budget is not None and ratio is not None:
        raise ValueError(f"give {budget_name} or {ratio_name}, not both")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"{budget_name} must be an int, got {type(budget).__name__}")
        if clamp:
            budget = min(budget, n)
        if not 1 <= budget <= n:
            raise ValueError(f"{budget_name} must be in [1, {n}] (the patch tokens per image), got {budget}")
        return budget
    ratio = default_ratio if ratio is None else ratio
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"{ratio_name} must be in (0, 1], got {ratio}")
    return min(n, max(1, round_half_even(float(ratio) * n)))


class ViTTower:
    """What HiPrune needs to know about a CLIP/SigLIP-style tower: its layers, prefix tokens and patch grid."""

    def __init__(self, vision_model: torch.nn.Module):
        kind = type(vision_model).__name__
        if kind not in TOWER_CLASSES:
            raise TypeError(f"hiprune: unsupported vision tower {kind}; supported towers: {', '.join(TOWER_CLASSES)}")
        self.model = vision_model
        inner = getattr(vision_model, "vision_model", vision_model)  # older transformers nest the encoder
        self.layers = inner.encoder.layers
        self.depth = len(self.layers)
        self.num_prefix = 1 if hasattr(inner.embeddings, "class_embedding") else 0
        config = vision_model.config
        self.grid = config.image_size // config.patch_size

    def attention(self, layer: int) -> torch.nn.Module:
        return self.layers[layer - 1].self_attn

    def attach(self, layers) -> list[torch.nn.Module]:
        """Marks the given 1-based layers for scoring (those not yet marked); returns the modules it marked."""
        return capture.attach_all([self.attention(layer) for layer in layers], self.num_prefix)

    def detach(self, modules) -> None:
        for module in modules:
            capture.detach(module)

    def run(self, pixel_values: torch.Tensor, object_layer: int, deep_layer: int, hidden_states=()):
        """Runs the tower once, no deeper than needed; returns (output, {index: hidden state} for the given
        indices, object scores (B, N), deep scores (B, N)).

        hidden_states: indices into a full run's output.hidden_states (0 the embeddings, i >= 1 layer i's output,
        negative from the end); each comes back bit for bit, and no other layer's output is kept. No layer after
        the deepest of these, the object and the deep layer runs (LLaVA feeds its projector the second-to-last
        layer's output). output: the model's output when every layer ran, else None.
        """
        slots = {layer: capture.slot_of(self.attention(layer)) for layer in (object_layer, deep_layer)}
        for slot in slots.values():
            slot.reset()
        for index in hidden_states:
            if not -(self.depth + 1) <= index <= self.depth:
                raise ValueError(f"hiprune: vision_feature_layer {index} does not exist: this {self.depth}-layer "
                                 f"tower's hidden_states are [-{self.depth + 1}, {self.depth}]")
        layer_of = {index: index if index >= 0 else self.depth + 1 + index for index in hidden_states}
        wanted = set(layer_of.values())
        kept: dict[int, torch.Tensor] = {}
        dtype = next(self.model.parameters()).dtype
        if 0 in wanted:  # the embeddings: transformers' own hidden_states
            output = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
            kept = {layer: output.hidden_states[layer] for layer in wanted}
        else:
            output = self._run_layers(pixel_values.to(dtype), max(object_layer, deep_layer, *wanted), wanted, kept)
        scores = [slots[layer].single_score(layer) for layer in (object_layer, deep_layer)]
        for slot in slots.values():
            slot.reset()
        n = scores[0].shape[1]
        if n != self.grid * self.grid:
            raise ValueError(f"hiprune: the tower produced {n} patch tokens, not a {self.grid}x{self.grid} grid "
                             "(pixel_values must have the configured image_size)")
        return output, {index: kept[layer] for index, layer in layer_of.items()}, scores[0], scores[1]

    def _run_layers(self, pixel_values, last: int, wanted, kept: dict):
        """Runs layers 1..last, keeping the outputs of the `wanted` layers in `kept`; the model's output if `last` is
        the last layer, else None (a hook on layer `last` stops the forward there)."""
        stop = last < self.depth and not torch.compiler.is_compiling()

        def keep_output(layer):
            def hook(module, args, output):
                if layer in wanted:
                    kept[layer] = output[0] if isinstance(output, tuple) else output
                if stop and layer == last:
                    raise _TowerStop
            return hook

        handles = [self.layers[layer - 1].register_forward_hook(keep_output(layer)) for layer in wanted | {last}]
        try:
            return self.model(pixel_values=pixel_values, return_dict=True)
        except _TowerStop:
            return None
        finally:
            for handle in handles:
                handle.remove()


class _TowerStop(Exception):
    """Raised by the hook of the deepest layer a run needs: the layers after it are skipped."""


def _deep_features(tower: ViTTower, pixel_values: torch.Tensor, object_layer: int, deep_layer: int):
    """(patch features of the deep layer (B, N, C), object scores, deep scores): the deep layer's output, or the
    model's last_hidden_state when it is the last layer (so SigLIP's post-layernorm is included)."""
    last = deep_layer == tower.depth
    output, kept, obj_scores, deep_scores = tower.run(pixel_values, object_layer, deep_layer,
                                                      () if last else (deep_layer,))
    features = output.last_hidden_state if last else kept[deep_layer]
    return features[:, tower.num_prefix:], obj_scores, deep_scores


def encode(vision_model: torch.nn.Module, pixel_values: torch.Tensor, budget: Optional[int] = None, *,
           ratio: Optional[float] = None, alpha: float = 0.1, object_layer: Optional[int] = None,
           deep_layer: Optional[int] = None, neighborhood: str = "cross", official: bool = False) -> EncodeOutput:
    """Runs a bare tower (CLIPVisionModel / SiglipVisionModel) and keeps `budget` patch tokens per image.

    Scores come from q and k of the object and deep layers (see capture.py); every layer keeps its attention
    implementation. features are the deep layer's output (last_hidden_state when it is the last layer, so SigLIP's
    post-layernorm is included), prefix tokens removed, gathered at the kept indices: (B, budget, C).
    Returns EncodeOutput(features, indices, roles), a tuple: `features, _, _ = encode(...)` or `.features`.
    """
    tower = ViTTower(vision_model)
    obj = resolve_layer(object_layer, tower.depth, default_object_layer(tower.depth), "object_layer")
    deep = resolve_layer(deep_layer, tower.depth, tower.depth, "deep_layer")
    n = tower.grid * tower.grid
    keep = resolve_budget(budget, ratio, n, 1 / 3)
    marked = tower.attach((obj, deep))
    try:
        features, obj_scores, deep_scores = _deep_features(tower, pixel_values, obj, deep)
    finally:
        tower.detach(marked)
    indices, roles = ops.select_with_roles(obj_scores, deep_scores, keep, tower.grid, tower.grid, alpha, 0,
                                           neighborhood, official)
    kept = features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return EncodeOutput(kept, indices, roles)


class HiPruneVisionTower(torch.nn.Module):
    """A tower whose forward returns only the kept features (B, budget, C), for frameworks that call
    `tower(pixel_values)` and want features. The capture stays attached until `.remove()`; compile it freely."""

    def __init__(self, vision_model: torch.nn.Module, budget: Optional[int] = None, *, ratio: Optional[float] = None,
                 alpha: float = 0.1, object_layer: Optional[int] = None, deep_layer: Optional[int] = None,
                 neighborhood: str = "cross", official: bool = False):
        super().__init__()
        self.tower_model = vision_model
        tower = ViTTower(vision_model)
        self.object_layer = resolve_layer(object_layer, tower.depth, default_object_layer(tower.depth),
                                          "object_layer")
        self.deep_layer = resolve_layer(deep_layer, tower.depth, tower.depth, "deep_layer")
        self.budget = resolve_budget(budget, ratio, tower.grid * tower.grid, 1 / 3)
        self.alpha, self.neighborhood, self.official = float(alpha), neighborhood, bool(official)
        self._marked = tower.attach((self.object_layer, self.deep_layer))
        self._tower = tower
        self.last_indices: Optional[torch.Tensor] = None
        self.last_roles: Optional[torch.Tensor] = None

    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        tower = self._tower
        features, obj_scores, deep_scores = _deep_features(tower, pixel_values, self.object_layer, self.deep_layer)
        indices, roles = ops.select_with_roles(obj_scores, deep_scores, self.budget, tower.grid, tower.grid,
                                               self.alpha, 0, self.neighborhood, self.official)
        kept = features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return EncodeOutput(kept, indices, roles)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values).features

    def remove(self) -> torch.nn.Module:
        """Detaches the capture; returns the untouched tower."""
        self._tower.detach(self._marked)
        self._marked = []
        return self.tower_model
