"""Families apply_hiprune refuses, each with the reason the capture or the pruning cannot run as it is.

A model is refused if its class or its vision tower's class is listed here (a refused tower is refused under any
model class). The reasons also say what support would take.
"""

from __future__ import annotations

from typing import Optional

import torch

REFUSED: dict[str, str] = {
    "Idefics2ForConditionalGeneration": ("its tower takes a patch padding mask, and its perceiver resampler turns "
                                         "all patches into 64 learned latents: no patch grid reaches the language "
                                         "model, so there is nothing to select on"),
    "MllamaForConditionalGeneration": ("images enter the language model through cross-attention layers, not as "
                                       "tokens in the prompt: there are no visual tokens to drop from the prefill"),
    "Gemma3nForConditionalGeneration": ("its vision tower is MobileNet-v5 (convolutional, through timm): there is no "
                                        "ViT attention to score"),
}


def refusal(model: torch.nn.Module) -> Optional[str]:
    """'<family>: <reason>' if the model or its vision tower is refused, else None."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        tower = getattr(model, "vision_tower", None)
    for candidate in (model, tower):
        if candidate is None:
            continue
        for klass in type(candidate).__mro__:
            reason = REFUSED.get(klass.__name__)
            if reason is not None:
                return f"{klass.__name__}: {reason}"
    return None
