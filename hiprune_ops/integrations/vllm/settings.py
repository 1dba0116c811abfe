"""HiPrune settings for vLLM: the server default, the per-request override, and the kept count per image.

The rules are settings.py's, the same as apply_hiprune's. Server default, first found: the model config's `hiprune`
dict (`hf_overrides={"hiprune": {...}}`, keys of apply_hiprune: budget or ratio, alpha, object_layer, deep_layer,
neighborhood, official), else the environment variable HIPRUNE_BUDGET (an int), else off. Per request,
`mm_processor_kwargs={"hiprune_budget": 64}` or `{"hiprune_ratio": 0.25}` replaces the default's budget / ratio for
that request's images (settings.REQUEST_KEYS); 0 or 1.0 keeps every token; an unknown hiprune_* key is refused.
The processor turns this into one number per image, `keep_count`, which it writes both into the prompt (that many
placeholders) and into the image's inputs (field HIPRUNE_KEEP_FIELD), so the encoder keeps exactly that many.

No vLLM import here: the processor, the workers and the tests all use this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..settings import PAIRS, REQUEST_KEYS, SETTING_FIELDS, PruneSettings, request_key_of

CONFIG_ATTR = "hiprune"
ENV_BUDGET = "HIPRUNE_BUDGET"
HIPRUNE_KEEP_FIELD = "hiprune_keep"
_VIDEO_FIELDS = ("video_budget", "video_ratio")
_CONFIG_KEYS = tuple(f for f in SETTING_FIELDS if f not in _VIDEO_FIELDS)


@dataclass(frozen=True)
class HiPruneSettings(PruneSettings):
    enabled: bool = False
    # The image budget / ratio came from the request: errors name its keys (hiprune_budget, hiprune_ratio).
    from_request: bool = field(default=False, compare=False)

    @classmethod
    def from_hf_config(cls, hf_config: Any, environ: Mapping[str, str] = os.environ) -> "HiPruneSettings":
        raw = getattr(hf_config, CONFIG_ATTR, None)
        if raw is None:
            env = environ.get(ENV_BUDGET, "").strip()
            if not env:
                return cls()
            try:
                budget = int(env)
            except ValueError:
                raise ValueError(f"{ENV_BUDGET} must be an int (tokens kept per image), got {env!r}") from None
            raw = {"budget": budget}
        if not isinstance(raw, Mapping):
            raise TypeError(f"hf_overrides['{CONFIG_ATTR}'] must be a dict with keys {', '.join(_CONFIG_KEYS)}, "
                            f"got {type(raw).__name__}")
        video = sorted(set(raw) & set(_VIDEO_FIELDS))
        if video:
            raise ValueError(f"hf_overrides['{CONFIG_ATTR}']: {', '.join(video)}: the vLLM plugin does not prune "
                             "videos yet (they pass through whole)")
        unknown = sorted(set(raw) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"hf_overrides['{CONFIG_ATTR}']: unknown keys {unknown}; known: "
                             f"{', '.join(_CONFIG_KEYS)}")
        settings = cls(enabled=True, **raw)
        settings.validate()
        return settings

    def validate(self) -> None:
        try:
            self.validated()
        except ValueError as error:
            raise type(error)(f"hiprune: {error}") from None

    def for_request(self, mm_kwargs: Mapping[str, Any]) -> "HiPruneSettings":
        """The settings for one request: its hiprune_* values (settings.REQUEST_KEYS), if given, replace the
        default's. Any other hiprune_* key is refused: a typo would otherwise be dropped without a word."""
        updated = self.with_request(mm_kwargs)
        if updated is self:
            return self
        image_pair = any(REQUEST_KEYS.get(k) in PAIRS[0] for k in mm_kwargs if mm_kwargs[k] is not None)
        return replace(updated, enabled=True, from_request=image_pair)

    def keep_count(self, n: int, clamp: bool = False, default_ratio: float = 1 / 3) -> int:
        """Tokens kept out of an image's n: n when off (disabled, budget 0 or ratio 1.0).

        clamp: a budget above n keeps n (families whose images differ in size); otherwise it is an error.
        default_ratio: the family's, when the setting gives neither budget nor ratio.
        """
        if not self.enabled:
            return n
        if not self.from_request:
            return self.keep(n, default_ratio, clamp=clamp)
        key_of = request_key_of()
        try:
            return self.keep(n, default_ratio, clamp=clamp, names=tuple(key_of.get(f, f) for f in PAIRS[0]))
        except ValueError as error:
            raise type(error)(f"mm_processor_kwargs: {error}") from None


def strip_request_keys(mm_kwargs: Mapping[str, Any]) -> dict:
    """mm kwargs without ours, for the Hugging Face processor (which does not know them)."""
    return {k: v for k, v in mm_kwargs.items() if k not in REQUEST_KEYS}
