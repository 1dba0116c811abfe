"""HiPrune settings for vLLM: the server default, the per-request override, and the kept count per item.

The rules are settings.py's, the same as apply_hiprune's. Server default, first found: the model config's `hiprune`
dict (`hf_overrides={"hiprune": {...}}`, keys of apply_hiprune: budget or ratio, video_budget or video_ratio,
alpha, object_layer, deep_layer, neighborhood, official, prompt_beta), else the environment variable HIPRUNE_BUDGET
(an int), else off. Per request, `mm_processor_kwargs={"hiprune_budget": 64}` or `{"hiprune_ratio": 0.25}`
replaces the default's budget / ratio for that request's images, `hiprune_video_budget` / `hiprune_video_ratio` its
video slices, `hiprune_prompt_beta` its HiPrune++ prompt tokens (settings.REQUEST_KEYS); 0 or 1.0 keeps every token;
an unknown hiprune_* key is refused. The processor turns this into one number per image (per video: per temporal
slice), `keep_count`, which it writes both into the prompt (that many placeholders, plus HiPrune++'s extra tokens)
and into the item's inputs (field KEEP_FIELDS[modality]), so the encoder keeps exactly that many.

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
# Per modality, the processor output holding each item's kept count (a video's: per temporal slice).
KEEP_FIELDS = {"image": HIPRUNE_KEEP_FIELD, "video": "hiprune_video_keep"}
# HiPrune++ (prompt_beta > 0, images of the bindings that add prompt tokens): per image, the prompt's text token ids,
# the request's prompt_beta and the extra tokens it adds (prompt_extra_count), written by the processor.
PROMPT_IDS_FIELD = "hiprune_prompt_ids"
PROMPT_BETA_FIELD = "hiprune_prompt_beta_value"
PROMPT_EXTRA_FIELD = "hiprune_prompt_extra"
# The same per video (bindings whose videos get prompt tokens per temporal slice): its prompt's text ids, the
# request's prompt_beta, the extra tokens of each of its slices.
VIDEO_PROMPT_FIELDS = ("hiprune_video_prompt_ids", "hiprune_video_prompt_beta_value", "hiprune_video_prompt_extra")
# The request's prompt text ids, put in the processor kwargs by the processor's apply so that vLLM's item hash (its
# processor, encoder and prefix caches) depends on them; not a request key (the leading underscore).
PROMPT_IDS_KWARG = "_hiprune_prompt_ids"


@dataclass(frozen=True)
class HiPruneSettings(PruneSettings):
    enabled: bool = False
    # The fields the request gave: errors about them name its keys (hiprune_budget, hiprune_video_ratio, ...).
    request_fields: frozenset = field(default=frozenset(), compare=False)

    @property
    def from_request(self) -> bool:
        """The image budget / ratio came from the request."""
        return bool(self.request_fields & set(PAIRS[0]))

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
            raise TypeError(f"hf_overrides['{CONFIG_ATTR}'] must be a dict with keys {', '.join(SETTING_FIELDS)}, "
                            f"got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SETTING_FIELDS))
        if unknown:
            raise ValueError(f"hf_overrides['{CONFIG_ATTR}']: unknown keys {unknown}; known: "
                             f"{', '.join(SETTING_FIELDS)}")
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
        given = frozenset(REQUEST_KEYS[k] for k in mm_kwargs if k in REQUEST_KEYS and mm_kwargs[k] is not None)
        if not self.enabled and not given & set(PAIRS[0]):
            updated = replace(updated, budget=0)  # a server without a default: a video value prunes videos only
        return replace(updated, enabled=True, request_fields=given)

    @property
    def video_given(self) -> bool:
        """A video budget or ratio is set (the server default's or the request's)."""
        return self.video_budget is not None or self.video_ratio is not None

    def keep_count(self, n: int, clamp: bool = False, default_ratio: float = 1 / 3, kind: str = "image") -> int:
        """Tokens kept out of an item's n: n when off (disabled, budget 0 or ratio 1.0).

        clamp: a budget above n keeps n (families whose items differ in size); otherwise it is an error.
        default_ratio: the family's, when the setting gives neither budget nor ratio.
        kind: "image", or "video" for a video slice (video_budget / video_ratio, else the image values).
        """
        if not self.enabled:
            return n
        _, _, pair = self.pair(kind)
        if not self.request_fields & set(pair):
            return self.keep(n, default_ratio, clamp=clamp, kind=kind)
        key_of = request_key_of()
        try:
            return self.keep(n, default_ratio, clamp=clamp, kind=kind, names=tuple(key_of.get(f, f) for f in pair))
        except ValueError as error:
            raise type(error)(f"mm_processor_kwargs: {error}") from None


def request_hiprune_keys(mm_kwargs: Mapping[str, Any]) -> list[str]:
    """The hiprune_* keys a request gives (known or not), sorted: what a model the plugin cannot prune refuses."""
    return sorted(k for k in mm_kwargs if isinstance(k, str) and k.startswith("hiprune_"))


def strip_request_keys(mm_kwargs: Mapping[str, Any]) -> dict:
    """mm kwargs without ours, for the Hugging Face processor (which does not know them)."""
    return {k: v for k, v in mm_kwargs.items() if k not in REQUEST_KEYS and k != PROMPT_IDS_KWARG}
