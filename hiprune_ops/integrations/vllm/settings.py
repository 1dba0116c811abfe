"""HiPrune settings for vLLM: the server default, the per-request override, and the kept count per image.

Server default, first found: the model config's `hiprune` dict (`hf_overrides={"hiprune": {...}}`, keys of
apply_hiprune: budget or ratio, alpha, object_layer, deep_layer, neighborhood, official), else the environment
variable HIPRUNE_BUDGET (an int), else off. Per request, `mm_processor_kwargs={"hiprune_budget": 64}` or
`{"hiprune_ratio": 0.25}` replaces the default's budget / ratio for that request's images; 0 or 1.0 keeps every
token. The processor turns this into one number per image, `keep_count`, which it writes both into the prompt (that
many placeholders) and into the image's inputs (field HIPRUNE_KEEP_FIELD), so the encoder keeps exactly that many.

No vLLM import here: the processor, the workers and the tests all use this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..._validation import check_selection_options
from ..towers import resolve_budget

CONFIG_ATTR = "hiprune"
ENV_BUDGET = "HIPRUNE_BUDGET"
REQUEST_KEYS = ("hiprune_budget", "hiprune_ratio")
HIPRUNE_KEEP_FIELD = "hiprune_keep"
_CONFIG_KEYS = ("budget", "ratio", "alpha", "object_layer", "deep_layer", "neighborhood", "official")


@dataclass(frozen=True)
class HiPruneSettings:
    enabled: bool = False
    budget: Optional[int] = None
    ratio: Optional[float] = None
    alpha: float = 0.1
    object_layer: Optional[int] = None
    deep_layer: Optional[int] = None
    neighborhood: str = "cross"
    official: bool = False

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
        unknown = sorted(set(raw) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"hf_overrides['{CONFIG_ATTR}']: unknown keys {unknown}; known: "
                             f"{', '.join(_CONFIG_KEYS)}")
        settings = cls(enabled=True, **raw)
        settings.validate()
        return settings

    def validate(self) -> None:
        check_selection_options(float(self.alpha), self.neighborhood, bool(self.official))
        if self.budget is not None and self.ratio is not None:
            raise ValueError("hiprune: give budget or ratio, not both")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 0):
            raise ValueError(f"hiprune: budget must be an int >= 0 (0 keeps every token), got {self.budget!r}")
        if self.ratio is not None:
            _check_ratio(self.ratio, "ratio")

    def for_request(self, mm_kwargs: Mapping[str, Any]) -> "HiPruneSettings":
        """The settings for one request: its hiprune_budget / hiprune_ratio, if given, replace the default's.

        Any other hiprune_* key is refused: a typo would otherwise be dropped without a word."""
        unknown = sorted(k for k in mm_kwargs if isinstance(k, str) and k.startswith("hiprune_")
                         and k not in REQUEST_KEYS)
        if unknown:
            raise ValueError(f"mm_processor_kwargs: unknown hiprune key(s) {', '.join(unknown)}; known keys: "
                             f"{', '.join(REQUEST_KEYS)}")
        budget, ratio = mm_kwargs.get("hiprune_budget"), mm_kwargs.get("hiprune_ratio")
        if budget is None and ratio is None:
            return self
        if budget is not None and ratio is not None:
            raise ValueError("mm_processor_kwargs: give hiprune_budget or hiprune_ratio, not both")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"mm_processor_kwargs: hiprune_budget must be an int >= 0 (0 keeps every token), "
                             f"got {budget!r}")
        if ratio is not None:
            _check_ratio(ratio, "hiprune_ratio")
        return HiPruneSettings(True, budget, None if ratio is None else float(ratio), self.alpha,
                               self.object_layer, self.deep_layer, self.neighborhood, self.official)

    def keep_count(self, n: int, clamp: bool = False) -> int:
        """Tokens kept out of an image's n: n when off (budget 0, ratio 1.0 or disabled).

        clamp: a budget above n keeps n (Qwen2.5-VL, whose images differ in size); otherwise it is an error.
        """
        if not self.enabled or self.budget == 0:
            return n
        if self.budget is None and self.ratio is None:
            raise ValueError("hiprune: switched on without a budget or ratio")
        return resolve_budget(self.budget, self.ratio, n, 1.0, clamp=clamp)


def _check_ratio(ratio: Any, name: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (1.0 keeps every token), got {ratio!r}")


def strip_request_keys(mm_kwargs: Mapping[str, Any]) -> dict:
    """mm kwargs without ours, for the Hugging Face processor (which does not know them)."""
    return {k: v for k, v in mm_kwargs.items() if k not in REQUEST_KEYS}
