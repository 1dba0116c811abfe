"""apply_hiprune for Hugging Face transformers VLMs: one module per model family, the pipeline in base.py.

A family module declares what differs (tower, prefix, merger or pooling, placeholder ids, positions); importing it
registers its classes in base.FAMILIES, where apply_hiprune finds the family from the model's class.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..towers import TOWER_CLASSES
from . import (gemma3, gemma4, glm4v, idefics3, internvl, llava, llava_onevision, paligemma, pixtral,  # noqa: F401
               qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl)  # (importing registers the families)
from .base import FAMILIES, Adapter, family_for, make_forward, make_generate
from .refused import refusal

_STATE_ATTR = "_hiprune_state"


def supported_models() -> tuple[str, ...]:
    return tuple(FAMILIES)


def _supported_message() -> str:
    return (f"supported models: {', '.join(FAMILIES)}; for bare towers ({', '.join(TOWER_CLASSES)}) use "
            "hiprune_ops.encode or HiPruneVisionTower")


def apply_hiprune(model: torch.nn.Module, budget: Optional[int] = None, ratio: Optional[float] = None,
                  alpha: float = 0.1, object_layer: Optional[int] = None, deep_layer: Optional[int] = None,
                  neighborhood: str = "cross", official: bool = False, *, video_budget: Optional[int] = None,
                  video_ratio: Optional[float] = None, prompt_beta: float = 0.0,
                  prompt_special_ids: Sequence[int] = ()) -> torch.nn.Module:
    """Patches a supported VLM in place so its language model only sees the HiPrune-kept visual tokens.

    Supported classes (docs/huggingface.md has each one's defaults):
    - LlavaForConditionalGeneration (LLaVA-1.5), LlavaNextForConditionalGeneration (LLaVA-NeXT);
    - Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration,
      Qwen3VLMoeForConditionalGeneration, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
      Glm4vForConditionalGeneration (GLM-4.1V), Glm4vMoeForConditionalGeneration (GLM-4.5V),
      Glm46VForConditionalGeneration (GLM-4.6V): images and videos.
    - InternVLForConditionalGeneration (InternVL 3 / 3.5; budget per tile, thumbnail and video frame, of 256),
      Gemma3ForConditionalGeneration (per image, of 256 pooled tokens), PaliGemmaForConditionalGeneration,
      Mistral3ForConditionalGeneration and any model with a PixtralVisionModel tower (per image, clamped to it),
      Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration (per tile).
    - Gemma4ForConditionalGeneration (per image and video frame, of its own soft tokens, clamped to it),
      LlavaOnevisionForConditionalGeneration (images as LLaVA-NeXT; video per frame after its 2x2 pooling).
    Refused with NotImplementedError naming the class and the reason (hf/refused.py): Idefics2, Mllama, Gemma3n.

    budget: tokens kept per image (LLaVA-NeXT: over the base image and its tiles; Qwen-style and GLM: per image and
    per video slice, clamped to it); or ratio of each image's tokens; neither: the model's default (LLaVA-1.5
    192/576, LLaVA-NeXT 640/2880, Qwen-style and GLM 0.334, the others 1/3). video_budget / video_ratio: the same
    per temporal slice of a video (default: budget / ratio); only for families that take pixel_values_videos
    (InternVL's frames arrive as images: budget applies). object_layer / deep_layer: 1-based layer numbers
    (negative from the end); None: the model's default scaled to its depth.
    prompt_beta (HiPrune++, in [0, 1]; default 0: HiPrune exactly): every image or video slice whose prompt has
    text also keeps prompt_extra_count(kept, n, prompt_beta) more tokens, on top of the budget: the not-kept ones
    whose features (as the language model receives them) are most similar to the mean input embedding of the
    prompt's text (integrations/prompt.py: the text after the row's last visual placeholder, up to the next special
    token). prompt_special_ids: token ids that are never prompt text, besides the config's token ids (pass
    processor.tokenizer.all_special_ids for chat templates). Returns the model. Undo with remove_hiprune(model).
    """
    name = type(model).__name__
    refused = refusal(model)
    if refused is not None:
        raise NotImplementedError(f"apply_hiprune: refused, {refused}")
    family = family_for(model)
    if family is None:
        if name in TOWER_CLASSES:
            raise TypeError(f"apply_hiprune: {name} is a bare vision tower; use hiprune_ops.encode(model, "
                            f"pixel_values, budget) or HiPruneVisionTower. {_supported_message()}")
        raise TypeError(f"apply_hiprune: unsupported model {name}; {_supported_message()}")
    if _STATE_ATTR in model.__dict__:
        raise RuntimeError("apply_hiprune: the model is already patched; call remove_hiprune(model) first")
    adapter = family(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official,
                     video_budget=video_budget, video_ratio=video_ratio, prompt_beta=prompt_beta,
                     prompt_special_ids=prompt_special_ids)
    adapter.attach()
    model.__dict__[_STATE_ATTR] = adapter
    model.forward = make_forward(adapter, type(model).forward.__get__(model))
    model.generate = make_generate(adapter, type(model).generate.__get__(model))
    return model


def remove_hiprune(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes apply_hiprune: removes the instance overrides and the q/k capture. A no-op on an unpatched model."""
    adapter = model.__dict__.pop(_STATE_ATTR, None)
    if adapter is None:
        return model
    adapter.detach()
    for attr in ("forward", "generate"):
        model.__dict__.pop(attr, None)
    return model


def hiprune_state(model: torch.nn.Module) -> Optional[Adapter]:
    """The adapter of a patched model (its `.last` holds the latest selection), or None."""
    return model.__dict__.get(_STATE_ATTR)


__all__ = ["apply_hiprune", "remove_hiprune", "hiprune_state", "supported_models", "FAMILIES", "Adapter"]
