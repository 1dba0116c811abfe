"""Bare ViT towers (CLIPVisionModel, SiglipVisionModel): layer choice, scoring run, and `encode`.

Layers are numbered from 1 as in the paper ("the 9th layer"); negative numbers count from the end (-1 = last).
Defaults scale with depth: object layer = round(depth * 9 / 24) (the 9th of CLIP-L's 24, the 2nd of a 4-layer
test tower, never below 1); deep layer = the last layer for a bare tower (integrations pick the layer that feeds
their projector instead). Budgets follow settings.py (0 or ratio 1.0 keeps every token; above the grid: an error).
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch

from . import capture, families
from .selection import select_items
from .settings import PruneSettings, check_prompt_beta, resolve_layer


class EncodeOutput(NamedTuple):
    """Kept patch features (B, budget, C), their indices into the grid (B, budget) and roles (B, budget) int8
    (with a prompt embedding: budget + t, the t added tokens of role 3)."""
    features: torch.Tensor
    indices: torch.Tensor
    roles: torch.Tensor


TOWER_CLASSES = ("CLIPVisionModel", "SiglipVisionModel")


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

    def capture(self, object_layer: int, deep_layer: int) -> capture.SlotScores:
        """The (not yet attached) capture of the object and deep layers."""
        return capture.SlotScores([self.attention(layer) for layer in (object_layer, deep_layer)],
                                  [object_layer, deep_layer], self.num_prefix)

    def run(self, pixel_values: torch.Tensor, object_layer: int, deep_layer: int, hidden_states=()):
        """Runs the tower once, no deeper than needed; returns (output, {index: hidden state} for the given
        indices, object scores (B, N), deep scores (B, N)).

        hidden_states: indices into a full run's output.hidden_states (0 the embeddings, i >= 1 layer i's output,
        negative from the end); each comes back bit for bit, and no other layer's output is kept. No layer after
        the deepest of these, the object and the deep layer runs (LLaVA feeds its projector the second-to-last
        layer's output). output: the model's output when every layer ran, else None.
        """
        scores = self.capture(object_layer, deep_layer)
        for index in hidden_states:
            if not -(self.depth + 1) <= index <= self.depth:
                raise ValueError(f"hiprune: vision_feature_layer {index} does not exist: this {self.depth}-layer "
                                 f"tower's hidden_states are [-{self.depth + 1}, {self.depth}]")
        layer_of = {index: index if index >= 0 else self.depth + 1 + index for index in hidden_states}
        wanted = set(layer_of.values())
        kept: dict[int, torch.Tensor] = {}
        dtype = next(self.model.parameters()).dtype

        def run():
            if 0 in wanted:  # the embeddings: transformers' own hidden_states
                output = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
                kept.update({layer: output.hidden_states[layer] for layer in wanted})
                return output
            return self._run_layers(pixel_values.to(dtype), max(object_layer, deep_layer, *wanted), wanted, kept)

        output, scores = scores.scored(run)
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


class _Resolved(NamedTuple):
    settings: PruneSettings
    object_layer: int
    deep_layer: int
    budget: int


def _resolve(tower: ViTTower, settings: PruneSettings) -> _Resolved:
    geometry = families.BARE_TOWER
    settings.validated(takes_video=False, model=type(tower.model).__name__)
    depth = tower.depth
    obj = resolve_layer(settings.object_layer, depth, geometry.object_layer(depth, tower.model.config),
                        "object_layer")
    deep = resolve_layer(settings.deep_layer, depth, geometry.deep_layer(depth, tower.model.config), "deep_layer")
    budget = settings.keep(tower.grid * tower.grid, geometry.default_ratio, clamp=geometry.sizes_vary)
    return _Resolved(settings, obj, deep, budget)


def _select(tower: ViTTower, resolved: _Resolved, obj_scores, deep_scores, features=None, prompts=None):
    """(indices (B, budget [+ t]), roles) of every image: the one selection step (HiPrune++ given the prompts)."""
    batch = obj_scores.shape[0]
    indices, roles = select_items(obj_scores.unbind(0), deep_scores.unbind(0), [(tower.grid, tower.grid)] * batch,
                                  [resolved.budget] * batch, resolved.settings, features=features, prompts=prompts)
    return torch.stack(indices), torch.stack(roles)


def _image_prompts(prompt_embedding: Optional[torch.Tensor], batch: int) -> Optional[list[torch.Tensor]]:
    """A caller's prompt embedding, (C,) for every image or (B, C) one per image, as one (C,) per image."""
    if prompt_embedding is None:
        return None
    if not isinstance(prompt_embedding, torch.Tensor) or prompt_embedding.dim() not in (1, 2):
        raise ValueError(f"prompt_embedding must be a tensor (C,) or (B, C), got "
                         f"{getattr(prompt_embedding, 'shape', type(prompt_embedding).__name__)}")
    if prompt_embedding.dim() == 1:
        return [prompt_embedding] * batch
    if prompt_embedding.shape[0] != batch:
        raise ValueError(f"prompt_embedding has {prompt_embedding.shape[0]} rows for {batch} images")
    return list(prompt_embedding.unbind(0))


def _gather(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def encode(vision_model: torch.nn.Module, pixel_values: torch.Tensor, budget: Optional[int] = None, *,
           ratio: Optional[float] = None, alpha: float = 0.1, object_layer: Optional[int] = None,
           deep_layer: Optional[int] = None, neighborhood: str = "cross", official: bool = False,
           prompt_embedding: Optional[torch.Tensor] = None, prompt_beta: float = 0.1,
           prompt_projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> EncodeOutput:
    """Runs a bare tower (CLIPVisionModel / SiglipVisionModel) and keeps `budget` patch tokens per image.

    Scores come from q and k of the object and deep layers (see capture.py); every layer keeps its attention
    implementation. features are the deep layer's output (last_hidden_state when it is the last layer, so SigLIP's
    post-layernorm is included), prefix tokens removed, gathered at the kept indices: (B, budget, C).
    budget 0 or ratio 1.0 keeps every token (settings.py). Returns EncodeOutput(features, indices, roles), a tuple:
    `features, _, _ = encode(...)` or `.features`.

    HiPrune++: with prompt_embedding ((D,) for every image or (B, D), e.g. a paired CLIP text encoder's output),
    each image also keeps prompt_extra_count(budget, N, prompt_beta) more tokens (prompt_beta in [0, 1], default
    0.1, the paper's): the not-kept patches whose features are most similar to it, role 3. prompt_projection maps
    the patch features (B, N, C) into the prompt embedding's space first (for CLIP: the vision model's
    post_layernorm, then CLIPModel.visual_projection); default: the features themselves (D = C).
    """
    if prompt_embedding is None and prompt_projection is not None:
        raise ValueError("prompt_projection needs a prompt_embedding")
    tower = ViTTower(vision_model)
    resolved = _resolve(tower, PruneSettings(budget, ratio, alpha=alpha, object_layer=object_layer,
                                             deep_layer=deep_layer, neighborhood=neighborhood, official=official,
                                             prompt_beta=prompt_beta if prompt_embedding is not None else 0.0))
    if prompt_embedding is None:
        check_prompt_beta(prompt_beta)
    scores = tower.capture(resolved.object_layer, resolved.deep_layer).attach()
    try:
        features, obj_scores, deep_scores = _deep_features(tower, pixel_values, resolved.object_layer,
                                                           resolved.deep_layer)
    finally:
        scores.detach()
    prompts = _image_prompts(prompt_embedding, features.shape[0])
    ranked = None
    if prompts is not None:
        with torch.no_grad():
            ranked = features if prompt_projection is None else prompt_projection(features)
    indices, roles = _select(tower, resolved, obj_scores, deep_scores, ranked, prompts)
    return EncodeOutput(_gather(features, indices), indices, roles)


class HiPruneVisionTower(torch.nn.Module):
    """A tower whose forward returns only the kept features (B, budget, C), for frameworks that call
    `tower(pixel_values)` and want features. The capture stays attached until `.remove()`; compile it freely.

    The two stages are public too: `scores(pixel_values)` runs the tower (no layer past the deepest needed) and
    returns both layers' scores, `select(object_scores, deep_scores)` the kept indices and roles; `capture_paused()`
    runs the plain tower inside it (the demo's baseline)."""

    def __init__(self, vision_model: torch.nn.Module, budget: Optional[int] = None, *, ratio: Optional[float] = None,
                 alpha: float = 0.1, object_layer: Optional[int] = None, deep_layer: Optional[int] = None,
                 neighborhood: str = "cross", official: bool = False):
        super().__init__()
        self.tower_model = vision_model
        tower = ViTTower(vision_model)
        resolved = _resolve(tower, PruneSettings(budget, ratio, alpha=alpha, object_layer=object_layer,
                                                 deep_layer=deep_layer, neighborhood=neighborhood, official=official))
        self.object_layer, self.deep_layer, self.budget = resolved.object_layer, resolved.deep_layer, resolved.budget
        self.alpha, self.neighborhood, self.official = float(alpha), neighborhood, bool(official)
        self.grid = tower.grid
        self._resolved = resolved
        self._capture = tower.capture(self.object_layer, self.deep_layer).attach()
        self._tower = tower
        self.last_indices: Optional[torch.Tensor] = None
        self.last_roles: Optional[torch.Tensor] = None

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The tower's encoder layers, first first (for hooks such as a progress display)."""
        return self._tower.layers

    def scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(object scores, deep scores), each (B, grid * grid): the tower run up to the deeper of the two layers."""
        _, _, obj_scores, deep_scores = self._tower.run(pixel_values, self.object_layer, self.deep_layer)
        return obj_scores, deep_scores

    def select(self, object_scores: torch.Tensor, deep_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (B, budget), roles (B, budget)) for the scores of scores()."""
        return _select(self._tower, self._resolved, object_scores, deep_scores)

    @contextlib.contextmanager
    def capture_paused(self):
        """Inside, the tower runs without the q/k capture (exactly the unpatched model); attached again after."""
        self._capture.detach()
        try:
            yield self.tower_model
        finally:
            self._capture.attach()

    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        features, obj_scores, deep_scores = _deep_features(self._tower, pixel_values, self.object_layer,
                                                           self.deep_layer)
        indices, roles = self.select(obj_scores, deep_scores)
        return EncodeOutput(_gather(features, indices), indices, roles)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values).features

    def remove(self) -> torch.nn.Module:
        """Detaches the capture; returns the untouched tower."""
        self._capture.detach()
        return self.tower_model
