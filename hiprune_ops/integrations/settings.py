"""HiPrune's settings and the one rule set that turns them into kept counts and layer numbers, for every framework.

`apply_hiprune`, `encode` / `HiPruneVisionTower`, the vLLM server default and the vLLM per-request values all build
a `PruneSettings` and ask it the same questions, so they accept and refuse the same values with the same words:

- budget (tokens kept per item: an image, a tile, a video slice) or ratio (of each item's tokens), not both;
  video_budget / video_ratio the same for video slices (default: the image setting). Neither: the family's
  default ratio.
- budget 0 or ratio 1.0 keeps every token (pruning off); a negative budget, a ratio outside (0, 1] is an error.
- a budget above an item's tokens: an error where every item of the family has one size (known before any input:
  LLaVA-1.5, InternVL, Gemma 3, PaliGemma, Idefics3, bare towers), clamped to the item where items differ in size
  (Qwen-style and GLM images and video slices, Pixtral / Mistral 3 images, Gemma 4 images and video frames,
  LLaVA-NeXT and LLaVA-OneVision tiles). Where a budget counts over an image's tiles: split_over_tiles.
- a value of the wrong type raises `SettingTypeError`, both a TypeError and a ValueError (a vLLM server answers a
  ValueError with HTTP 400), naming the argument.
- layers: 1-based (the paper's "9th layer"), negative from the end; None: the family's default.
- prompt_beta (HiPrune++): a number in [0, 1] (the op's range, docs/ops.md); each item whose prompt has text gets
  prompt_extra_count(kept, n, prompt_beta) more tokens, the not-kept ones most similar to the prompt. 0 (the
  default here) is HiPrune exactly.

No framework import here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .._validation import check_selection_options, round_half_even


class SettingTypeError(TypeError, ValueError):
    """A setting of the wrong type (a TypeError, and a ValueError so that servers report it as a bad request)."""


# Budget / ratio pairs: (budget field, ratio field). A request may give one of each pair, not both.
PAIRS = (("budget", "ratio"), ("video_budget", "video_ratio"))
# vLLM per-request keys (mm_processor_kwargs) -> the field each replaces. Adding a request key is one line here.
REQUEST_KEYS: dict[str, str] = {
    "hiprune_budget": "budget",
    "hiprune_ratio": "ratio",
    "hiprune_video_budget": "video_budget",
    "hiprune_video_ratio": "video_ratio",
    "hiprune_prompt_beta": "prompt_beta",
}


def keep_count(budget: Any, ratio: Any, n: int, default_ratio: float, *, clamp: bool,
               names: tuple[str, str] = ("budget", "ratio")) -> int:
    """Tokens kept out of an item's n: the one rule (see the module docstring). names: what the caller calls the
    two values, for the errors (video_budget, hiprune_ratio, ...)."""
    check_budget_ratio(budget, ratio, names)
    budget_name, _ = names
    if budget is not None:
        if budget == 0:
            return n
        if budget > n and not clamp:
            raise ValueError(f"{budget_name} must be in [0, {n}] (the tokens per item; 0 keeps every token), "
                             f"got {budget}")
        return min(budget, n)
    ratio = default_ratio if ratio is None else float(ratio)
    return min(n, max(1, round_half_even(ratio * n)))


def split_over_tiles(budget: int, tiles: int, tile_tokens: int, name: str = "budget") -> int:
    """Tokens each tile keeps when a budget (> 0) counts over an image's tiles (LLaVA-NeXT and LLaVA-OneVision:
    the base image and its AnyRes tiles): budget // tiles, at most a tile's tokens; none left is an error. A ratio,
    or budget 0, applies to each tile as to any item (keep_count). name: what the caller calls the budget."""
    keep = min(tile_tokens, budget // tiles)
    if keep < 1:
        raise ValueError(f"{name}={budget} leaves no token per tile for an image with {tiles} tiles")
    return keep


def check_budget_ratio(budget: Any, ratio: Any, names: tuple[str, str] = ("budget", "ratio")) -> None:
    """Type and range of a budget / ratio pair, without an item size."""
    budget_name, ratio_name = names
    if budget is not None and ratio is not None:
        raise ValueError(f"give {budget_name} or {ratio_name}, not both")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise SettingTypeError(f"{budget_name} must be an int (tokens kept per item; 0 keeps every token), "
                                   f"got {type(budget).__name__} {budget!r}")
        if budget < 0:
            raise ValueError(f"{budget_name} must be an int >= 0 (0 keeps every token), got {budget}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise SettingTypeError(f"{ratio_name} must be a number in (0, 1] (1.0 keeps every token), got "
                                   f"{type(ratio).__name__} {ratio!r}")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"{ratio_name} must be a number in (0, 1] (1.0 keeps every token), got {ratio!r}")


def check_prompt_beta(beta: Any, name: str = "prompt_beta") -> None:
    """prompt_beta: a number in [0, 1] (0: HiPrune exactly, no prompt tokens). name: what the caller calls it."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise SettingTypeError(f"{name} must be a number in [0, 1] (0: no prompt tokens), got "
                               f"{type(beta).__name__} {beta!r}")
    if not 0.0 <= float(beta) <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be a number in [0, 1] (0: no prompt tokens), got {beta!r}")


def resolve_layer(layer: Optional[int], depth: int, default: int, name: str) -> int:
    """1-based layer number (negative counts from the end), or None for `default` -> 1-based layer, validated."""
    if layer is None:
        return default
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SettingTypeError(f"{name} must be an int (1-based layer number), got {type(layer).__name__}")
    if layer < 0:
        layer = depth + 1 + layer
    if not 1 <= layer <= depth:
        raise ValueError(f"{name} must be in [1, {depth}] (or [-{depth}, -1]) for this {depth}-layer tower, "
                         f"got {layer}")
    return layer


@dataclass(frozen=True)
class PruneSettings:
    """What a user chooses; `validated()` checks every value, `keep` gives an item's kept count."""
    budget: Optional[int] = None
    ratio: Optional[float] = None
    video_budget: Optional[int] = None
    video_ratio: Optional[float] = None
    alpha: float = 0.1
    object_layer: Optional[int] = None
    deep_layer: Optional[int] = None
    neighborhood: str = "cross"
    official: bool = False
    prompt_beta: float = 0.0

    def validated(self, takes_video: bool = True, model: str = "this model") -> "PruneSettings":
        """Checks every value (types, ranges, pairs); returns self. takes_video False: video values are refused."""
        for pair in PAIRS:
            check_budget_ratio(getattr(self, pair[0]), getattr(self, pair[1]), pair)
        if not takes_video and (self.video_budget is not None or self.video_ratio is not None):
            raise ValueError(f"video_budget / video_ratio: {model} takes no video input")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise SettingTypeError(f"alpha must be a number in [0, 1], got {type(self.alpha).__name__}")
        if not isinstance(self.neighborhood, str):
            raise SettingTypeError(f"neighborhood must be 'cross' or 'square', got {type(self.neighborhood).__name__}")
        if not isinstance(self.official, bool):
            raise SettingTypeError(f"official must be a bool, got {type(self.official).__name__}")
        for name in ("object_layer", "deep_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SettingTypeError(f"{name} must be an int (1-based layer number), got {type(value).__name__}")
        check_selection_options(float(self.alpha), self.neighborhood, self.official)
        check_prompt_beta(self.prompt_beta)
        return self

    def pair(self, kind: str = "image") -> tuple[Any, Any, tuple[str, str]]:
        """(budget, ratio, their names) for a kind of item: a video slice takes video_budget / video_ratio when
        either is given, else the image values."""
        if kind == "video" and (self.video_budget is not None or self.video_ratio is not None):
            return self.video_budget, self.video_ratio, PAIRS[1]
        return self.budget, self.ratio, PAIRS[0]

    def keep(self, n: int, default_ratio: float, *, clamp: bool, kind: str = "image",
             names: Optional[tuple[str, str]] = None) -> int:
        """Tokens kept out of an item's n (the rule of keep_count). names: what the caller calls the pair."""
        budget, ratio, pair_names = self.pair(kind)
        return keep_count(budget, ratio, n, default_ratio, clamp=clamp, names=names or pair_names)

    def with_request(self, values: Mapping[str, Any]) -> "PruneSettings":
        """These settings with a request's values (mm_processor_kwargs): unknown hiprune_* keys are refused (a typo
        would otherwise do nothing), a given key replaces its field and, for a budget / ratio, the other of the pair.
        Checks the request's values, with the request's key names in the errors."""
        unknown = sorted(k for k in values if isinstance(k, str) and k.startswith("hiprune_") and k not in REQUEST_KEYS)
        if unknown:
            raise ValueError(f"mm_processor_kwargs: unknown hiprune key(s) {', '.join(unknown)}; known keys: "
                             f"{', '.join(REQUEST_KEYS)}")
        given = {REQUEST_KEYS[k]: v for k, v in values.items() if k in REQUEST_KEYS and v is not None}
        if not given:
            return self
        key_of = request_key_of()
        changes = {}
        if "prompt_beta" in given:
            try:
                check_prompt_beta(given["prompt_beta"], key_of["prompt_beta"])
            except ValueError as error:
                raise type(error)(f"mm_processor_kwargs: {error}") from None
        for budget_field, ratio_field in PAIRS:
            if budget_field in given or ratio_field in given:
                names = (key_of.get(budget_field, budget_field), key_of.get(ratio_field, ratio_field))
                try:
                    check_budget_ratio(given.get(budget_field), given.get(ratio_field), names)
                except ValueError as error:
                    raise type(error)(f"mm_processor_kwargs: {error}") from None
                changes[budget_field] = given.pop(budget_field, None)
                ratio = given.pop(ratio_field, None)
                changes[ratio_field] = None if ratio is None else float(ratio)
        changes.update(given)
        updated = dataclasses.replace(self, **changes)
        try:
            return updated.validated()
        except ValueError as error:
            raise type(error)(f"mm_processor_kwargs: {error}") from None


def request_key_of() -> dict[str, str]:
    """Settings field -> the request key that sets it."""
    return {field: key for key, field in REQUEST_KEYS.items()}


SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(PruneSettings))
