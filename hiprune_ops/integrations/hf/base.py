"""The part every integration shares: encode the images first, shrink the prompt, then call the model.

apply_hiprune sets two instance attributes, `forward` and `generate`, that wrap the class's own methods:
1. if pixel values (images, videos) come with input_ids, the adapter encodes them now, keeping `budget` tokens per
   image or video slice (scores from q and k of two tower layers, see capture.py), and projects them to the
   language model;
2. every item's placeholder run in input_ids is shrunk to its kept tokens (attention_mask, token types and labels
   alike), and the features go in as transformers' own `mm_encoder_outputs`, so the language model's prefill sees
   exactly the kept tokens;
3. the class's forward / generate runs unchanged. generate returns the ORIGINAL prompt followed by the new tokens,
   so `out[:, inputs.input_ids.shape[1]:]` still selects the answer.
remove_hiprune deletes the two attributes and the capture: the model is the same object with the same weights.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import capture, families, prompt
from ..sequence import Placeholders, ShrinkPlan, plan_shrink
from ..settings import PruneSettings, resolve_layer

_SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class EncodedImages:
    """The encoding of one kind of visual input: images, or video slices (each temporal slice is one item)."""
    features: list[torch.Tensor]                 # per item (n_kept_i, D), in the language model's embedding space
    full_counts: list[int]                       # placeholders the unpruned model needs per item
    kept_slots: list[torch.Tensor]               # per item: which of its placeholders stay (increasing)
    indices: list[torch.Tensor] = field(default_factory=list)   # per item/tile selection, for inspection
    roles: list[torch.Tensor] = field(default_factory=list)
    deepstack: list[list[torch.Tensor]] = field(default_factory=list)  # per extra feature level, per item


FAMILIES: dict[str, type["Adapter"]] = {}   # transformers class name -> the family that handles it


class Adapter:
    """A model family, declared by what differs from the shared pipeline below.

    A family lists the transformers classes it handles in `model_classes` (a subclass that lists any is registered
    in FAMILIES, where apply_hiprune looks models up), points at its geometry (families.py: prefix, merge, default
    layers and ratio, video, whether item sizes vary), names the input that carries each kind of visual input
    (`media_keys`) and the config attribute of its placeholder id (`<kind>_token_id` by default), names the tower's
    attention modules (`attention`, captured by attach), and implements encode (tower, selection, merger or
    projector) and, when the language model needs them, positions.
    """

    model_classes: tuple[str, ...] = ()
    geometry: families.Geometry = families.LLAVA
    media_keys: dict[str, str] = {"image": "pixel_values"}   # kind -> the input that carries it (encoder only)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("model_classes", ()):
            FAMILIES[name] = cls

    def __init__(self, model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official,
                 video_budget=None, video_ratio=None, prompt_beta=0.0, prompt_special_ids=()):
        self.model = model
        # Every value checked now (settings.py), not mid-generate.
        self.settings = PruneSettings(budget, ratio, video_budget, video_ratio, alpha, object_layer, deep_layer,
                                      neighborhood, official, prompt_beta).validated("video" in self.media_keys,
                                                                                     type(model).__name__)
        configs = (model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None))
        self.special_ids = prompt.config_token_ids(*configs) | {int(i) for i in prompt_special_ids}
        self.end_ids = prompt.config_token_ids(*configs, names=("eos_token_id",))
        self.prompts: Optional[tuple[list, dict]] = None  # HiPrune++: per row prompt embeddings, of this call
        self.budget, self.ratio, self.alpha = budget, ratio, float(alpha)
        self.video_budget, self.video_ratio = video_budget, video_ratio
        self.neighborhood, self.official = neighborhood, bool(official)
        self.last: Optional[EncodedImages] = None        # the latest images
        self.last_video: Optional[EncodedImages] = None  # the latest video slices
        self.capture: Optional[capture.SlotScores] = None

    @property
    def num_prefix(self) -> int:
        return self.geometry.num_prefix

    def geometry_config(self):
        """The config the geometry's functions take (families.Geometry.config_scope)."""
        return self.model.config

    def merge(self) -> int:
        return self.geometry.merge_of(self.geometry_config())

    def resolve_layers(self, depth: int) -> None:
        """object_layer / deep_layer: the user's, else the family's defaults for this depth."""
        config = self.geometry_config()
        self.object_layer = resolve_layer(self.settings.object_layer, depth,
                                          self.geometry.object_layer(depth, config), "object_layer")
        self.deep_layer = resolve_layer(self.settings.deep_layer, depth, self.geometry.deep_layer(depth, config),
                                        "deep_layer")

    def keep(self, n: int, kind: str = "image") -> int:
        """Tokens an item of n keeps (settings.py's rule, with this family's default ratio and clamping)."""
        return self.settings.keep(n, self.geometry.default_ratio, clamp=self.geometry.sizes_vary, kind=kind)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def attention(self, layer: int) -> torch.nn.Module:
        """The attention module of the tower's 1-based layer."""
        raise NotImplementedError

    one_call = True  # the tower calls each layer's attention once per encode (False: once per segment)

    def attach(self) -> None:
        """Captures q and k of the object and deep layers (those no one captures yet)."""
        layers = [self.object_layer, self.deep_layer]
        self.capture = capture.SlotScores([self.attention(layer) for layer in layers], layers, self.num_prefix,
                                          self.one_call).attach()

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()

    def feature_options(self, kwargs: dict) -> tuple:
        """(vision_feature_layer, vision_feature_select_strategy) of this call: the caller's, else the config's."""
        config = self.model.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        return (config.vision_feature_layer if layer is None else layer,
                strategy or getattr(config, "vision_feature_select_strategy", None))

    def encode_images(self, kwargs: dict) -> EncodedImages:
        raise NotImplementedError

    def encode(self, kwargs: dict) -> dict[str, EncodedImages]:
        """kind -> its encoding, for every kind present in kwargs."""
        return {"image": self.encode_images(kwargs)}

    def placeholder_mask(self, kind: str, kwargs: dict) -> torch.Tensor:
        return kwargs["input_ids"] == getattr(self.model.config, f"{kind}_token_id")

    def prompt_visual(self, kwargs: dict) -> torch.Tensor:
        """(B, L) bool: the visual tokens of prompt.py's text rule (the text follows the last of them): the
        placeholders of every kind given."""
        visual = torch.zeros_like(kwargs["input_ids"], dtype=torch.bool)
        for kind, key in self.media_keys.items():
            if kwargs.get(key) is not None:
                visual |= self.placeholder_mask(kind, kwargs)
        return visual

    def prompt_embeddings(self, kwargs: dict) -> list[Optional[torch.Tensor]]:
        """HiPrune++: per prompt row, the mean input embedding of its text (prompt.py's rule), or None (no text)."""
        input_ids = kwargs["input_ids"]
        text = prompt.text_mask(input_ids, self.prompt_visual(kwargs), self.special_ids, kwargs.get("attention_mask"),
                                self.end_ids)
        with torch.no_grad():
            return prompt.mean_embeddings(self.model.get_input_embeddings()(input_ids), text)

    def item_prompts(self, kind: str, counts) -> Optional[list[Optional[torch.Tensor]]]:
        """HiPrune++: the prompt embedding of each item of a kind, the items owning the next `counts[i]`
        placeholders of that kind in prompt order (unpruned counts); None when prompt_beta is 0."""
        if self.prompts is None:
            return None
        embeddings, kwargs = self.prompts
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [embeddings[row] for row in prompt.item_rows(self.placeholder_mask(kind, kwargs), starts)]

    def encoder_outputs(self, encoded: dict[str, EncodedImages], new: dict) -> dict:
        """What the class's forward takes as mm_encoder_outputs."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return {kind: BaseModelOutputWithPooling(pooler_output=tuple(e.features)) for kind, e in encoded.items()}

    def positions(self, kwargs: dict, plan: ShrinkPlan, new: dict, for_generate: bool):
        """Position ids for the shrunk prompt, or None to let the model recompute them (LLaVA: recompacted)."""
        return None

    # -- the shared pipeline -------------------------------------------------------------------------------------
    def prepare(self, kwargs: dict, for_generate: bool):
        """(new kwargs, plan) with the images encoded and the prompt shrunk; None if there is nothing to prune."""
        if all(kwargs.get(key) is None for key in self.media_keys.values()) or kwargs.get("mm_encoder_outputs"):
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("hiprune: pruning needs input_ids (to find the image placeholders), not only "
                             "inputs_embeds")
        if kwargs.get("position_ids") is not None:
            raise ValueError("hiprune: explicit position_ids cannot follow the pruned prompt; leave them out")
        if self.settings.prompt_beta > 0:
            self.prompts = self.prompt_embeddings(kwargs), kwargs
        try:
            with torch.no_grad() if for_generate else contextlib.nullcontext():
                encoded = self.encode(kwargs)
        finally:
            self.prompts = None
        self.last, self.last_video = encoded.get("image"), encoded.get("video")
        mask = kwargs.get("attention_mask")
        plan = plan_shrink(input_ids, [Placeholders(self.placeholder_mask(kind, kwargs), e.full_counts,
                                                    e.kept_slots, kind) for kind, e in encoded.items()], mask)
        new = {k: v for k, v in kwargs.items() if k not in self.media_keys.values()}
        new["input_ids"] = plan.take(input_ids, _pad_id(self.model))
        if mask is not None or bool((plan.removed != plan.removed[0]).any()):
            base_mask = mask if mask is not None else torch.ones_like(input_ids)
            new["attention_mask"] = plan.take(base_mask, 0)
        for key in _SEQUENCE_KEYS:
            if kwargs.get(key) is not None:
                new[key] = plan.take(kwargs[key], 0)
        if kwargs.get("labels") is not None:
            new["labels"] = plan.take(kwargs["labels"], -100)
        positions = self.positions(kwargs, plan, new, for_generate)
        if positions is not None:
            new["position_ids"] = positions
        new["mm_encoder_outputs"] = self.encoder_outputs(encoded, new)
        return new, plan


def family_for(model: torch.nn.Module) -> Optional[type[Adapter]]:
    """The family registered for the model's vision tower class (a Pixtral tower under LLaVA), else for the model's
    class or its nearest registered base class, or None."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    for candidate in (tower, model):
        for klass in type(candidate).__mro__ if candidate is not None else ():
            family = FAMILIES.get(klass.__name__)
            if family is not None:
                return family
    return None


def _pad_id(model) -> int:
    for source in (getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pad, int):
            return pad
    return 0


def _merge_args(fn, args, kwargs, first: str) -> dict:
    if len(args) > 1:
        raise TypeError(f"hiprune-patched {fn} takes at most one positional argument ({first}); pass the rest "
                        "by keyword")
    if args:
        kwargs = dict(kwargs)
        kwargs[first] = args[0]
    return kwargs


def make_forward(adapter: Adapter, original):
    @functools.wraps(original)
    def forward(*args, **kwargs):
        kwargs = _merge_args("forward", args, kwargs, "input_ids")
        prepared = adapter.prepare(kwargs, for_generate=False)
        if prepared is None:
            return original(**kwargs)
        return original(**prepared[0])

    return forward


def make_generate(adapter: Adapter, original):
    @functools.wraps(original)
    def generate(*args, **kwargs):
        if args:
            kwargs = _merge_args("generate", args, kwargs, "input_ids")
        if kwargs.get("inputs") is not None and kwargs.get("input_ids") is None:
            kwargs["input_ids"] = kwargs.pop("inputs")
        prepared = adapter.prepare(kwargs, for_generate=True)
        if prepared is None:
            return original(**kwargs)
        new, plan = prepared
        shrunk_length = new["input_ids"].shape[1]
        output = original(**new)
        prompt = kwargs["input_ids"]
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        repeat = sequences.shape[0] // prompt.shape[0]
        restored = torch.cat([prompt.repeat_interleave(repeat, dim=0).to(sequences.device),
                              sequences[:, shrunk_length:]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output

    return generate
