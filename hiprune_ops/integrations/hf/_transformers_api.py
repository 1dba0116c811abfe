"""Every use of transformers' private or module-level API, in one place; each checked with transformers 5.23.0.

What is not public in transformers (no docs, may move in any release) and the integration still needs. Imports are
lazy: importing hiprune_ops does not import transformers.
"""

from __future__ import annotations

import sys


def attention_functions() -> dict:
    """The name -> attention function mapping every attention module looks its kernel up in at call time.
    Checked: transformers 5.23.0, AttentionInterface._global_mapping (a class attribute dict)."""
    from transformers.modeling_utils import AttentionInterface
    return AttentionInterface._global_mapping


def sdpa_attention_forward():
    """transformers' SDPA attention function, to know when the capture wraps it.
    Checked: transformers 5.23.0, transformers.integrations.sdpa_attention.sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as forward
    return forward


def eager_attention_owner(module_name: str):
    """The modeling module whose global `eager_attention_forward` an eager attention layer calls.
    Checked: transformers 5.23.0 (every modeling file defines and calls its own eager_attention_forward)."""
    return sys.modules[module_name]


def qwen2_5_vl_window_index(grid_thw, visual):
    """Qwen2.5-VL's window index: the raster index of each merge unit in the order the tower runs them.
    Checked: transformers 5.23.0, transformers.vision_utils.get_vision_window_index and the tower's
    spatial_merge_size, window_size, patch_size attributes."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return window_index


def llava_next_layout():
    """(get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image): LLaVA-NeXT's tiling helpers.
    Checked: transformers 5.23.0, module-level functions of transformers.models.llava_next.modeling_llava_next."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches, unpad_image)
    return get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image


def deepstack_output_class(model):
    """Qwen3-VL's encoder output with deepstack features; Qwen3-VL and Qwen3-VL-MoE each define it in their own
    modeling module. Checked: transformers 5.23.0, BaseModelOutputWithDeepstackFeatures."""
    return sys.modules[type(model).__module__].BaseModelOutputWithDeepstackFeatures


def set_rope_deltas(inner_model, deltas) -> None:
    """Qwen-style models keep the decode position offset in `rope_deltas` between generate steps.
    Checked: transformers 5.23.0, the attribute of Qwen2/2.5/3-VL, Qwen3.5 and GLM-4V models."""
    inner_model.rope_deltas = deltas
