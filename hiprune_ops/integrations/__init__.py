"""HiPrune in other libraries: Hugging Face transformers (hf/) and bare ViT towers (towers.py).

    model = hiprune_ops.apply_hiprune(model, budget=192)   # patches in place, returns the model
    model.generate(**processor(images=..., text=...))      # unchanged call; the LLM sees the kept tokens only
    hiprune_ops.remove_hiprune(model)                      # back to the exact original

    features, indices, roles = hiprune_ops.encode(clip_vision_model, pixel_values, budget=192)

Shared by every integration: capture.py (scores from q and k inside the attention interface: every layer keeps its
attention implementation and no (L, L) map exists) and sequence.py (shrinking a prompt to its kept tokens).
hf/base.py holds the transformers pipeline, hf/<family>.py each model family's differences and defaults.
"""

from .hf import apply_hiprune, hiprune_state, remove_hiprune, supported_models
from .towers import TOWER_CLASSES, EncodeOutput, HiPruneVisionTower, encode

SUPPORTED_MODELS = supported_models()

__all__ = ["apply_hiprune", "remove_hiprune", "encode", "EncodeOutput", "HiPruneVisionTower", "hiprune_state",
           "SUPPORTED_MODELS", "TOWER_CLASSES"]
