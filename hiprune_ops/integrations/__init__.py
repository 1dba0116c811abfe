"""One-line HiPrune for Hugging Face transformers models.

    model = hiprune_ops.apply_hiprune(model, budget=192)   # patches in place, returns the model
    model.generate(**processor(images=..., text=...))      # unchanged call; the LLM sees the kept tokens only
    hiprune_ops.remove_hiprune(model)                      # back to the exact original

    features, indices, roles = hiprune_ops.encode(clip_vision_model, pixel_values, budget=192)

Scores are computed from q and k inside two tower layers through transformers' attention interface (capture.py):
every layer keeps its attention implementation and no (L, L) map exists. See base.py for the pipeline and the
model modules for each model's defaults.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Adapter, make_forward, make_generate
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .towers import TOWER_CLASSES, EncodeOutput, HiPruneVisionTower, encode

ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_class: cls for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter)
}
SUPPORTED_MODELS = tuple(ADAPTERS)
_STATE_ATTR = "_hiprune_state"


def _supported_message() -> str:
    return (f"supported models: {', '.join(SUPPORTED_MODELS)}; for bare towers ({', '.join(TOWER_CLASSES)}) use "
            "hiprune_ops.encode or HiPruneVisionTower")


def apply_hiprune(model: torch.nn.Module, budget: Optional[int] = None, ratio: Optional[float] = None,
                  alpha: float = 0.1, object_layer: Optional[int] = None, deep_layer: Optional[int] = None,
                  neighborhood: str = "cross", official: bool = False) -> torch.nn.Module:
    """Patches a supported VLM in place so its language model only sees the HiPrune-kept visual tokens.

    budget: tokens kept per image (LLaVA-NeXT: over the base image and its tiles; Qwen2.5-VL: clamped to each
    image); or ratio of each image's tokens; neither: the model's default (LLaVA-1.5 192/576, LLaVA-NeXT 640/2880,
    Qwen2.5-VL 0.334). object_layer / deep_layer: 1-based layer numbers (negative from the end); None: the model's
    default scaled to its depth. Returns the model. Undo with remove_hiprune(model).
    """
    name = type(model).__name__
    adapter_class = ADAPTERS.get(name)
    if adapter_class is None:
        if name in TOWER_CLASSES:
            raise TypeError(f"apply_hiprune: {name} is a bare vision tower; use hiprune_ops.encode(model, "
                            f"pixel_values, budget) or HiPruneVisionTower. {_supported_message()}")
        raise TypeError(f"apply_hiprune: unsupported model {name}; {_supported_message()}")
    if _STATE_ATTR in model.__dict__:
        raise RuntimeError("apply_hiprune: the model is already patched; call remove_hiprune(model) first")
    adapter = adapter_class(model, budget, ratio, alpha, object_layer, deep_layer, neighborhood, official)
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


__all__ = ["apply_hiprune", "remove_hiprune", "encode", "EncodeOutput", "HiPruneVisionTower", "hiprune_state",
           "SUPPORTED_MODELS"]
