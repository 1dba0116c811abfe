"""Tiny random checkpoints of the VLM families vLLM 0.32 serves, built offline from configs.

One builder per architecture writes config, weights and processor files (the tokenizer is tiny_models' word-level
one) into a folder that vLLM's CPU build loads like a released checkpoint. Towers have 4 layers (an object layer
and a deep layer that differ), language models 2, widths 64 (head_dim 32, as vLLM's CPU kernels want). Where
transformers 5.19 saves something a released checkpoint holds otherwise (a key level, an expert layout, a config
field vLLM reads), the builder writes what the released files hold, and says so.

    python tiny_families.py build ROOT [NAME ...]       # writes ROOT/NAME for each family

Engines run on them through scenario.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import _fix_llava_tower_keys, _tokenizer  # noqa: E402  (the vLLM tests' one recipe)

VOCAB = 256
VIDEO_FRAMES = 4
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    """How to build one architecture and prompt it: the placeholder text, the image size and placeholder id."""
    architecture: str
    build: Callable[[str], str]
    image_prompt: str
    image_size: tuple[int, int]          # height, width in pixels
    image_token: int                     # the placeholder id counted in the prompt
    video_prompt: Optional[str] = None   # None: no video path tested
    video_frames: int = VIDEO_FRAMES
    video_token: Optional[int] = None
    engine: dict = field(default_factory=dict)


def _save(model_class, config, path: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(path)


def _rewrite_weights(path: str, rewrite: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]) -> None:
    """Renames or reshapes saved tensors where transformers' layout differs from the released checkpoints'."""
    from safetensors.torch import load_file, save_file

    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            save_file(dict(rewrite(k, v) for k, v in load_file(file).items()), file, metadata={"format": "pt"})


def _transposed_experts(key: str, tensor: torch.Tensor):
    """transformers 5 saves fused experts as (E, out, in); released Qwen3-VL-MoE files (and vLLM) hold (E, in, out)."""
    if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return key, tensor.transpose(1, 2).contiguous()
    return key, tensor


# -- Qwen-VL style: packed patches with grid_thw, 2x2 merge, M-RoPE ------------------------------------------------
QWEN_START, QWEN_IMAGE, QWEN_VIDEO, QWEN_END = 150, 151, 152, 153
QWEN_SPECIAL = {"<|vision_start|>": QWEN_START, "<|image_pad|>": QWEN_IMAGE, "<|video_pad|>": QWEN_VIDEO,
                "<|vision_end|>": QWEN_END}
QWEN_IMAGE_PROMPT = "user : <|vision_start|><|image_pad|><|vision_end|> describe the picture please"
QWEN_VIDEO_PROMPT = "user : <|vision_start|><|video_pad|><|vision_end|> describe the picture please"
QWEN_IDS = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                vision_end_token_id=QWEN_END)


def _qwen_tokenizer():
    return _tokenizer(QWEN_SPECIAL, VOCAB, extra_special_tokens={"image_token": "<|image_pad|>",
                                                                 "video_token": "<|video_pad|>",
                                                                 "vision_start_token": "<|vision_start|>",
                                                                 "vision_end_token": "<|vision_end|>"})


def _qwen_processor(processor_class, video_processor_class, patch: int, size):
    pixels = size[0] * size[1]
    unit = patch * 2
    common = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=unit * unit, max_pixels=pixels, **common)
    # A video's pixel limit counts all its frames: VIDEO_FRAMES frames keep the image's grid.
    video_processor = video_processor_class(size={"shortest_edge": unit * unit,
                                                  "longest_edge": VIDEO_FRAMES * pixels}, **common)
    return processor_class(image_processor=image_processor, tokenizer=_qwen_tokenizer(),
                           video_processor=video_processor)


QWEN2_SIZE = (168, 112)   # 14 px patches: 12 x 8 patches -> 6 x 4 merged tokens
QWEN3_SIZE = (192, 128)   # 16 px patches: the same 6 x 4 merged grid


def build_qwen2_vl(path: str, seed: int = 2) -> str:
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=4, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                "rope_theta": 1e4}),
        torch_dtype="float32", **QWEN_IDS)
    _save(transformers.Qwen2VLForConditionalGeneration, config, path, seed)
    _qwen_processor(transformers.Qwen2VLProcessor, transformers.Qwen2VLVideoProcessor, 14,
                    QWEN2_SIZE).save_pretrained(path)
    return path


QWEN3_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
QWEN3_ROPE = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True, "rope_theta": 1e4}


def _qwen3_processor():
    return _qwen_processor(transformers.Qwen3VLProcessor, transformers.Qwen3VLVideoProcessor, 16, QWEN3_SIZE)


def build_qwen3_vl(path: str, seed: int = 3) -> str:
    config = transformers.Qwen3VLConfig(
        vision_config=dict(QWEN3_VISION, deepstack_visual_indexes=[1, 2]),
        text_config=dict(TEXT, head_dim=32, rope_parameters=QWEN3_ROPE), torch_dtype="float32", **QWEN_IDS)
    _save(transformers.Qwen3VLForConditionalGeneration, config, path, seed)
    _qwen3_processor().save_pretrained(path)
    return path


def build_qwen3_vl_moe(path: str, seed: int = 4) -> str:
    config = transformers.Qwen3VLMoeConfig(
        vision_config=dict(QWEN3_VISION, deepstack_visual_indexes=[1, 2]),
        text_config=dict(TEXT, head_dim=32, rope_parameters=QWEN3_ROPE, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=64, decoder_sparse_step=1,
                         norm_topk_prob=True),  # released configs carry it; vLLM reads it, transformers' lacks it
        torch_dtype="float32", **QWEN_IDS)
    _save(transformers.Qwen3VLMoeForConditionalGeneration, config, path, seed)
    _rewrite_weights(path, _transposed_experts)
    _qwen3_processor().save_pretrained(path)
    return path


# vLLM's CPU gated-delta-net kernel (the linear-attention layers) takes head_dim 128 only.
QWEN3_5_TEXT = dict(TEXT, head_dim=32, rope_parameters=dict(QWEN3_ROPE, partial_rotary_factor=1.0),
                    layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                    linear_num_value_heads=1)


def build_qwen3_5(path: str, seed: int = 5) -> str:
    config = transformers.Qwen3_5Config(vision_config=QWEN3_VISION, text_config=QWEN3_5_TEXT,
                                        torch_dtype="float32", **QWEN_IDS)
    _save(transformers.Qwen3_5ForConditionalGeneration, config, path, seed)
    _qwen3_processor().save_pretrained(path)
    return path


def build_qwen3_5_moe(path: str, seed: int = 6) -> str:
    text = dict(QWEN3_5_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                shared_expert_intermediate_size=64)
    text.pop("intermediate_size")
    config = transformers.Qwen3_5MoeConfig(vision_config=QWEN3_VISION, text_config=text, torch_dtype="float32",
                                           **QWEN_IDS)
    _save(transformers.Qwen3_5MoeForConditionalGeneration, config, path, seed)
    _qwen3_processor().save_pretrained(path)
    return path


# -- GLM-4.1V / 4.5V / 4.6V: the Qwen2-VL pipeline with GLM's tokens, a learned position table and RMSNorm ------
GLM_SPECIAL = {"<|begin_of_image|>": 150, "<|image|>": 151, "<|end_of_image|>": 152, "<|begin_of_video|>": 153,
               "<|video|>": 154, "<|end_of_video|>": 155}
GLM_IMAGE, GLM_VIDEO = GLM_SPECIAL["<|image|>"], GLM_SPECIAL["<|video|>"]
GLM_IMAGE_PROMPT = "user : <|begin_of_image|><|image|><|end_of_image|> describe the picture please"
GLM_VIDEO_PROMPT = "user : <|begin_of_video|><|video|><|end_of_video|> describe the picture please"
GLM_IDS = dict(image_token_id=GLM_IMAGE, video_token_id=GLM_VIDEO, image_start_token_id=150, image_end_token_id=152,
               video_start_token_id=153, video_end_token_id=155)
GLM_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, image_size=112,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# GLM's rotary covers half of each head (partial_rotary_factor 0.5): 16 of 32 dims, 8 frequencies in 3 sections.
GLM_ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4, "partial_rotary_factor": 0.5}


def _glm_processor():
    pixels = 2 * QWEN2_SIZE[0] * QWEN2_SIZE[1]  # GLM's resize counts both frames of a temporal patch
    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    tokenizer = _tokenizer(GLM_SPECIAL, VOCAB, extra_special_tokens={"image_token": "<|image|>",
                                                                     "video_token": "<|video|>"})
    return transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": pixels},
                                                         **common),
        video_processor=transformers.Glm4vVideoProcessor(
            size={"shortest_edge": 28 * 28, "longest_edge": VIDEO_FRAMES * pixels},
            max_image_size={"longest_edge": VIDEO_FRAMES * pixels}, **common),
        tokenizer=tokenizer)


def build_glm4v(path: str, seed: int = 7) -> str:
    config = transformers.Glm4vConfig(vision_config=GLM_VISION, text_config=dict(TEXT, rope_parameters=GLM_ROPE),
                                      torch_dtype="float32", **GLM_IDS)
    _save(transformers.Glm4vForConditionalGeneration, config, path, seed)
    _glm_processor().save_pretrained(path)
    return path


def build_glm4v_moe(path: str, seed: int = 8) -> str:
    text = dict(TEXT, rope_parameters=GLM_ROPE, head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
                use_qk_norm=False)  # released configs carry it; vLLM reads it, transformers' lacks it
    config = transformers.Glm4vMoeConfig(vision_config=GLM_VISION, text_config=text, torch_dtype="float32",
                                         **GLM_IDS)
    _save(transformers.Glm4vMoeForConditionalGeneration, config, path, seed)
    _glm_processor().save_pretrained(path)
    return path


# -- one tile, or tiles, per image, each owning a fixed run of placeholders ----------------------------------------
SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, patch_size=14)


def build_internvl(path: str, seed: int = 9) -> str:
    """InternVL 3 / 3.5 in transformers' format: 112 px tiles of 8 x 8 patches (CLS first), pixel_shuffle 0.5 -> 16
    tokens per tile; a 112 x 224 image is 2 tiles and a thumbnail."""
    special = {"<img>": 150, "</img>": 151, "<IMG_CONTEXT>": 152, "<video>": 153}
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                           image_size=[112, 112], patch_size=[14, 14]),
        text_config=dict(TEXT, model_type="qwen2"), image_token_id=152, image_seq_length=16, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", torch_dtype="float32")
    _save(transformers.InternVLForConditionalGeneration, config, path, seed)
    tokenizer = _tokenizer(special, VOCAB, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    image_processor = transformers.GotOcr2ImageProcessor(size={"height": 112, "width": 112}, crop_to_patches=True,
                                                         min_patches=1, max_patches=4)
    video_processor = transformers.InternVLVideoProcessor(size={"height": 112, "width": 112})
    transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor, image_seq_length=16).save_pretrained(path)
    return path


# vLLM's Gemma 3 processor looks up the newline runs its image text brings ("\n\n" ... "\n\n\n\n": one token each).
GEMMA3_SPECIAL = {"<start_of_image>": 150, "<end_of_image>": 151, "<image_soft_token>": 152, "\n": 153, "\n\n": 154,
                  "\n\n\n": 155, "\n\n\n\n": 156}


def build_gemma3(path: str, seed: int = 10) -> str:
    """SigLIP at 224 px (16 x 16 patches), pooled 4 x 4 to 16 tokens per image."""
    text = dict(TEXT, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(vision_config=dict(SIGLIP, image_size=224), text_config=text,
                                       mm_tokens_per_image=16, boi_token_index=150, eoi_token_index=151,
                                       image_token_index=152, torch_dtype="float32")
    _save(transformers.Gemma3ForConditionalGeneration, config, path, seed)
    _fix_llava_tower_keys(path)  # the SigLIP tower, too, is saved without its `vision_model.` level
    tokenizer = _tokenizer(GEMMA3_SPECIAL, VOCAB, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 224, "width": 224}, do_pan_and_scan=False)
    transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                 image_seq_length=16).save_pretrained(path)
    return path


def build_paligemma(path: str, seed: int = 11) -> str:
    """SigLIP at 112 px: every one of its 8 x 8 patches is a token."""
    config = transformers.PaliGemmaConfig(vision_config=dict(SIGLIP, image_size=112, projection_dim=64),
                                          text_config=dict(TEXT, model_type="gemma", head_dim=32),
                                          image_token_index=150, projection_dim=64, hidden_size=64,
                                          torch_dtype="float32")
    _save(transformers.PaliGemmaForConditionalGeneration, config, path, seed)
    _fix_llava_tower_keys(path)
    # vLLM's PaliGemma processor ends the prompt with a "\n" token.
    tokenizer = _tokenizer({"<image>": 150, "\n": 151}, VOCAB, extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.SiglipImageProcessor(size={"height": 112, "width": 112}, image_seq_length=64)
    transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def build_llava_next(path: str, seed: int = 12) -> str:
    """CLIP at 112 px (8 x 8 patches and CLS); a 112 x 224 image is the base image and 1 x 2 tiles."""
    pinpoints = [[112, 224], [224, 112], [224, 224]]
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=2, image_size=112, patch_size=14,
                           projection_dim=64),
        text_config=dict(TEXT, model_type="llama"), image_token_index=150, image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64,
        torch_dtype="float32")
    _save(transformers.LlavaNextForConditionalGeneration, config, path, seed)
    _fix_llava_tower_keys(path)
    tokenizer = _tokenizer({"<image>": 150}, VOCAB, extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": 112},
                                                           crop_size={"height": 112, "width": 112},
                                                           image_grid_pinpoints=pinpoints)
    transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                    vision_feature_select_strategy="default",
                                    num_additional_image_tokens=1).save_pretrained(path)
    return path


PIXTRAL_SPECIAL = {"[IMG]": 150, "[IMG_BREAK]": 151, "[IMG_END]": 152}


def build_mistral3(path: str, seed: int = 13) -> str:
    """A Pixtral tower (each image at its own size, 14 px patches), then a 2 x 2 patch merger."""
    config = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, head_dim=32, image_size=224, patch_size=14),
        text_config=dict(TEXT, model_type="mistral", head_dim=32), image_token_index=150, spatial_merge_size=2,
        vision_feature_layer=-1, torch_dtype="float32")
    _save(transformers.Mistral3ForConditionalGeneration, config, path, seed)
    tokenizer = _tokenizer(PIXTRAL_SPECIAL, VOCAB)
    image_processor = transformers.PixtralImageProcessor(size={"longest_edge": 224}, patch_size=14)
    transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                  spatial_merge_size=2).save_pretrained(path)
    return path


IDEFICS_SPECIAL = {"<fake_token_around_image>": 150, "<image>": 151, "<end_of_utterance>": 152,
                   "<global-img>": 153, **{f"<row_{r}_col_{c}>": 154 + 6 * (r - 1) + (c - 1)
                                           for r in range(1, 7) for c in range(1, 7)}}


def _build_idefics(kind: str, path: str, seed: int, patch_size: int, scale_factor: int, **processor_parts) -> str:
    """Idefics3's layout (kind: "Idefics3" or "SmolVLM", transformers' class prefix): 112 px tiles of
    (112 / patch_size)^2 patches, pixel_shuffle scale_factor -> 16 tokens per tile; a 112 x 224 image is 1 x 2 tiles
    plus the global image."""
    config = getattr(transformers, f"{kind}Config")(
        vision_config=dict(SIGLIP, image_size=112, patch_size=patch_size), text_config=dict(TEXT, model_type="llama"),
        scale_factor=scale_factor, image_token_id=151, pad_token_id=0, torch_dtype="float32")
    _save(getattr(transformers, f"{kind}ForConditionalGeneration"), config, path, seed)
    image_processor = getattr(transformers, f"{kind}ImageProcessor")(size={"longest_edge": 224},
                                                                      max_image_size={"longest_edge": 112})
    tokenizer = _tokenizer(IDEFICS_SPECIAL, VOCAB, extra_special_tokens={"image_token": "<image>"})
    getattr(transformers, f"{kind}Processor")(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16,
                                              **processor_parts).save_pretrained(path)
    return path


def build_idefics3(path: str, seed: int = 14) -> str:
    """8 x 8 patches (14 px) per tile, pixel_shuffle 2."""
    return _build_idefics("Idefics3", path, seed, patch_size=14, scale_factor=2)


def build_smolvlm(path: str, seed: int = 15) -> str:
    """SmolVLM's pixel_shuffle 4: 16 x 16 patches (7 px) per tile. Its processor needs the num2words package."""
    return _build_idefics("SmolVLM", path, seed, patch_size=7, scale_factor=4,
                          video_processor=transformers.SmolVLMVideoProcessor())


# The audio tokens only let the processor be built (the config has no audio tower); newline runs as for Gemma 3.
GEMMA4_SPECIAL = {"<start_of_image>": 150, "<end_of_image>": 151, "<image_soft_token>": 152, "<|video|>": 153,
                  "<start_of_audio>": 154, "<end_of_audio>": 155, "<audio_soft_token>": 156, "\n": 157, "\n\n": 158}


def build_gemma4(path: str, seed: int = 16) -> str:
    """Gemma 4: 16 px patches, each image resized to at most 70 x 9 patches and pooled 3 x 3 to its soft tokens
    (a 224 x 224 image: 24 x 24 patches -> 64 tokens)."""
    text = dict(TEXT, head_dim=32, global_head_dim=32, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                  default_output_length=70)  # released configs carry it; vLLM reads it, transformers' lacks it
    config = transformers.Gemma4Config(vision_config=vision, text_config=text, audio_config=None, boi_token_id=150,
                                       eoi_token_id=151, image_token_id=152, video_token_id=153, boa_token_id=154,
                                       eoa_token_index=155, audio_token_id=156, torch_dtype="float32")
    _save(transformers.Gemma4ForConditionalGeneration, config, path, seed)
    tokenizer = _tokenizer(GEMMA4_SPECIAL, VOCAB, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"})
    transformers.Gemma4Processor(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
        image_processor=transformers.Gemma4ImageProcessor(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3),
        video_processor=transformers.Gemma4VideoProcessor(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3),
        tokenizer=tokenizer, image_seq_length=70).save_pretrained(path)
    return path


def build_llava_onevision(path: str, seed: int = 17) -> str:
    """LLaVA-OneVision: a SigLIP tower at 112 px (8 x 8 patches, no CLS), AnyRes tiles with row newlines; video
    frames resized by half to 4 x 4 tokens, one newline after the last frame."""
    pinpoints = [[112, 224], [224, 112], [224, 224]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(SIGLIP, model_type="siglip_vision_model", image_size=112),
        text_config=dict(TEXT, model_type="qwen2"), image_token_index=150, video_token_index=151,
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", torch_dtype="float32")
    _save(transformers.LlavaOnevisionForConditionalGeneration, config, path, seed)
    _fix_llava_tower_keys(path)
    tokenizer = _tokenizer({"<image>": 150, "<video>": 151}, VOCAB,
                           extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    image_processor = transformers.LlavaOnevisionImageProcessor(size={"height": 112, "width": 112},
                                                                image_grid_pinpoints=pinpoints)
    video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": 112, "width": 112})
    transformers.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=video_processor, num_image_tokens=64,
                                         vision_feature_select_strategy="full").save_pretrained(path)
    return path


def build_blip2(path: str, seed: int = 18) -> str:
    """BLIP-2 with OPT: a Q-Former reads the 8 x 8 patches (and CLS) of a 112 px image into 8 learned queries, the
    language model's only image tokens. No binding is planned: the queries are not patches, so there is nothing
    spatial to prune; the refusal tests run on it (test_vllm_families.py)."""
    text = {k: v for k, v in TEXT.items() if k not in ("intermediate_size", "num_key_value_heads")}
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                           image_size=112, patch_size=14),
        qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=64),
        text_config=dict(text, model_type="opt", ffn_dim=128, word_embed_proj_dim=64), num_query_tokens=8,
        image_token_index=150, torch_dtype="float32")
    _save(transformers.Blip2ForConditionalGeneration, config, path, seed)
    tokenizer = _tokenizer({"<image>": 150}, VOCAB, extra_special_tokens={"image_token": "<image>"})
    transformers.Blip2Processor(image_processor=transformers.BlipImageProcessor(size={"height": 112, "width": 112}),
                                tokenizer=tokenizer, num_query_tokens=8).save_pretrained(path)
    return path


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", build_qwen2_vl, QWEN_IMAGE_PROMPT, QWEN2_SIZE, QWEN_IMAGE,
                       QWEN_VIDEO_PROMPT, video_token=QWEN_VIDEO),
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", build_qwen3_vl, QWEN_IMAGE_PROMPT, QWEN3_SIZE, QWEN_IMAGE,
                       QWEN_VIDEO_PROMPT, video_token=QWEN_VIDEO),
    "qwen3_vl_moe": Family("Qwen3VLMoeForConditionalGeneration", build_qwen3_vl_moe, QWEN_IMAGE_PROMPT, QWEN3_SIZE,
                           QWEN_IMAGE, QWEN_VIDEO_PROMPT, video_token=QWEN_VIDEO),
    # vLLM's CPU gated-delta-net kernel (the linear-attention layers) takes bfloat16 only.
    "qwen3_5": Family("Qwen3_5ForConditionalGeneration", build_qwen3_5, QWEN_IMAGE_PROMPT, QWEN3_SIZE, QWEN_IMAGE,
                      QWEN_VIDEO_PROMPT, video_token=QWEN_VIDEO, engine={"dtype": "bfloat16"}),
    "qwen3_5_moe": Family("Qwen3_5MoeForConditionalGeneration", build_qwen3_5_moe, QWEN_IMAGE_PROMPT, QWEN3_SIZE,
                          QWEN_IMAGE, QWEN_VIDEO_PROMPT, video_token=QWEN_VIDEO, engine={"dtype": "bfloat16"}),
    "glm4v": Family("Glm4vForConditionalGeneration", build_glm4v, GLM_IMAGE_PROMPT, QWEN2_SIZE, GLM_IMAGE,
                    GLM_VIDEO_PROMPT, video_token=GLM_IMAGE),   # video frames use the image placeholder id
    "glm4v_moe": Family("Glm4vMoeForConditionalGeneration", build_glm4v_moe, GLM_IMAGE_PROMPT, QWEN2_SIZE, GLM_IMAGE,
                        GLM_VIDEO_PROMPT, video_token=GLM_IMAGE),
    "internvl": Family("InternVLForConditionalGeneration", build_internvl, "user : <IMG_CONTEXT> describe the picture",
                       (112, 224), 152),
    "gemma3": Family("Gemma3ForConditionalGeneration", build_gemma3, "user : <start_of_image> describe the picture",
                     (224, 224), 152),
    # PaliGemma takes no placeholder in the text: the processor puts the image tokens first.
    "paligemma": Family("PaliGemmaForConditionalGeneration", build_paligemma, "describe the picture", (112, 112), 150),
    "llava_next": Family("LlavaNextForConditionalGeneration", build_llava_next, "user : <image> describe the picture",
                         (112, 224), 150),
    "mistral3": Family("Mistral3ForConditionalGeneration", build_mistral3, "user : [IMG] describe the picture",
                       (112, 168), 150),
    "gemma4": Family("Gemma4ForConditionalGeneration", build_gemma4, "user : <image_soft_token> describe the picture",
                     (224, 224), 152, "user : <|video|> describe the picture", video_token=153),
    "llava_onevision": Family("LlavaOnevisionForConditionalGeneration", build_llava_onevision,
                              "user : <image> describe the picture", (112, 224), 150,
                              "user : <video> describe the picture", video_token=151),
    "idefics3": Family("Idefics3ForConditionalGeneration", build_idefics3, "user : <image> describe the picture",
                       (112, 224), 151),
    "smolvlm": Family("SmolVLMForConditionalGeneration", build_smolvlm, "user : <image> describe the picture",
                      (112, 224), 151),
    # No placeholder in the text: the processor puts the query tokens first. No binding (see build_blip2).
    "blip2": Family("Blip2ForConditionalGeneration", build_blip2, "describe the picture", (112, 112), 150),
}


# -- inputs ------------------------------------------------------------------------------------------------------
def video(seed: int, frames: int, size):
    """Frames with the metadata vLLM wants for Qwen3-VL-style timestamps (the others drop it)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (frames, size[0], size[1], 3), dtype=np.uint8)
    return array, {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
                   "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}


def main(argv: list[str]) -> None:
    if argv[0] == "build":
        root, names = argv[1], argv[2:] or list(FAMILIES)
        for name in names:
            FAMILIES[name].build(os.path.join(root, name))
    else:
        raise SystemExit(f"usage: {__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
