"""Models for the end-to-end cases, built offline from configs with random weights (timing needs no trained weights).

- CLIP ViT-L/14-336 (LLaVA-1.5's tower) and a Qwen2.5-VL-7B-shaped vision tower, each run three ways:
  plain SDPA (no pruning), ours (SDPA + qk_scores of two layers + select), and the published recipe (eager
  attention with every layer's map, then the per-image loop of hiprune_ops/published.py);
- a LLaVA-1.5-shaped VLM (CLIP-L tower, 4096-wide LLaMA language model) at reduced depth, for prefill timings
  through apply_hiprune.
"""

from __future__ import annotations

import contextlib
import os
import types
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hiprune_ops  # noqa: E402
from hiprune_ops.cli import LLAMA_7B, VIT_L14_336, prefill_flops  # noqa: E402

from hiprune_ops import published  # noqa: E402

# Qwen2.5-VL-7B's vision tower (32 blocks, full attention in blocks 8, 16, 24, 32, 2x2 merge).
QWEN_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
PAPER_PREFILL_MS = {576: 54.3, 64: 22.0}  # the paper's LLaVA-1.5-7B prefill on an A100, 576 vs 64 tokens
LLAVA_OBJECT_LAYER, LLAVA_DEEP_LAYER = 9, 23


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Runs the block with the model's attention kernel switched to `name` (e.g. "eager"), then switches back."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# -- CLIP ViT-L/14-336 -------------------------------------------------------------------------------------------

def clip_config(overrides: dict):
    """CLIP ViT-L/14-336's config with `overrides` (e.g. fewer, narrower layers for the smoke test)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**dict(VIT_L14_336, **overrides), attn_implementation="sdpa")


def clip_encoder(device: str, overrides: dict):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    return CLIPVisionModel(clip_config(overrides)).to(device).eval()


def clip_versions(encoder, pixels: torch.Tensor, budget: int) -> dict:
    """name -> callable returning the LLaVA features the language model would get (B, tokens, 1024)."""
    depth = encoder.config.num_hidden_layers
    object_layer = max(1, round(depth * LLAVA_OBJECT_LAYER / 24))
    deep_layer = depth - 1  # LLaVA's vision_feature_layer -2

    def plain():
        with torch.inference_mode():
            return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[deep_layer][:, 1:]

    def ours():
        with torch.inference_mode():
            return hiprune_ops.encode(encoder, pixels, budget, object_layer=object_layer,
                                      deep_layer=deep_layer).features

    def recipe():
        with torch.inference_mode(), attention_implementation(encoder, "eager"):
            out = encoder(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        grid = encoder.config.image_size // encoder.config.patch_size
        mask = published.select_from_maps(out.attentions[object_layer - 1], out.attentions[deep_layer - 1],
                                          budget, grid)
        features = out.hidden_states[deep_layer][:, 1:]
        return features[mask].view(features.shape[0], budget, -1)

    # HiPrune++ at the paper's beta: a fixed random prompt embedding in the features' own space (a bare tower has
    # no language model); the cost is the same for any prompt: every patch's cosine, then the extra tokens.
    prompt = torch.randn(encoder.config.hidden_size, generator=torch.Generator().manual_seed(7)).to(pixels.device)

    def ours_prompt():
        with torch.inference_mode():
            return hiprune_ops.encode(encoder, pixels, budget, object_layer=object_layer, deep_layer=deep_layer,
                                      prompt_embedding=prompt, prompt_beta=0.1).features

    return {"plain SDPA, no pruning": plain, "ours (SDPA + qk_scores + select)": ours,
            "published recipe (eager maps + loop)": recipe, PROMPT_CANDIDATE: ours_prompt}


PROMPT_CANDIDATE = "HiPrune++ (ours + prompt_select, prompt_beta 0.1)"


# -- Qwen2.5-VL vision tower ------------------------------------------------------------------------------------

def qwen_config(overrides: dict):
    from transformers import Qwen2_5_VLVisionConfig

    config = Qwen2_5_VLVisionConfig(**dict(QWEN_VISION_7B, **overrides))
    config._attn_implementation = "sdpa"
    return config


def qwen_tower(device: str, overrides: dict):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(qwen_config(overrides)).to(device).eval()


def qwen_inputs(tower, grid_h: int, grid_w: int, device: str):
    """pixel_values (patches, 3 * 2 * 14 * 14) and grid_thw of one image of grid_h x grid_w patches."""
    c = tower.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(grid_h * grid_w, c.in_channels * c.temporal_patch_size * c.patch_size ** 2, generator=g)
    return pixels.to(device), torch.tensor([[1, grid_h, grid_w]], device=device)


def _recipe_attention(module, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """The release's eager vision attention: one (H, T, T) map over the whole image, masked to the windows (or
    the image) of cu_seqlens, used for the output and reduced to received attention per token (window order)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    t = hidden_states.shape[0]
    q, k, v = module.qkv(hidden_states).reshape(t, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device), cu_seqlens.diff())
    bias = torch.zeros(t, t, dtype=q.dtype, device=q.device)
    bias.masked_fill_(segment[:, None] != segment[None, :], torch.finfo(q.dtype).min)
    logits = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) * module.scaling + bias
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (weights @ v.transpose(0, 1)).transpose(0, 1).reshape(t, -1)
    module._recipe_scores.append(weights.mean(dim=0).sum(dim=0))
    return module.proj(out)


def qwen_versions(tower, pixels: torch.Tensor, grid_thw: torch.Tensor, ratio: float = 0.334) -> dict:
    """name -> callable returning the kept merged tokens of one image (kept, out_hidden_size)."""
    from hiprune_ops.integrations.hf.qwen2_5_vl import Qwen2_5_VLAdapter
    from transformers.vision_utils import get_vision_window_index

    # A bare tower: no config, so no special token ids (only HiPrune++ reads them).
    adapter = Qwen2_5_VLAdapter(SimpleNamespace(model=SimpleNamespace(visual=tower), config=SimpleNamespace()), None,
                                ratio, 0.1, None, None, "cross", False)
    depth = len(tower.blocks)
    object_layer = adapter.object_layer
    merge = tower.spatial_merge_size
    grid_h, grid_w = int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge
    n = grid_h * grid_w
    budget = round(ratio * n)

    def plain():
        with torch.inference_mode():
            return tower(pixels, grid_thw=grid_thw).pooler_output

    def ours():
        adapter.attach()
        try:
            with torch.inference_mode():
                return adapter.encode({"pixel_values": pixels, "image_grid_thw": grid_thw})["image"].features[0]
        finally:
            adapter.detach()

    def recipe():
        attns = [block.attn for block in tower.blocks]
        for attn in attns:
            attn._recipe_scores = []
            attn.forward = types.MethodType(_recipe_attention, attn)
        try:
            with torch.inference_mode():
                merged = tower(pixels, grid_thw=grid_thw).pooler_output
        finally:
            for attn in attns:
                del attn.forward
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=tower.window_size,
                                                  patch_size=tower.patch_size)
        reverse = torch.argsort(window_index)
        per_unit = [attn._recipe_scores[0].view(-1, merge * merge).mean(dim=-1)[reverse] for attn in attns]
        for attn in attns:
            del attn._recipe_scores
        mask = published.select_mask(per_unit[object_layer - 1][None], per_unit[depth - 1][None], budget, grid_w)
        return merged[mask[0]]

    return {"plain SDPA, no pruning": plain, "ours (SDPA + qk_scores + select)": ours,
            "published recipe (eager maps + loop)": recipe}


# -- LLaVA-1.5 prefill -----------------------------------------------------------------------------------------

IMAGE_TOKEN = 32000


def llama_config(lm: dict):
    """LLaVA-1.5-7B's language model (LLaMA, 4096 wide) with the overrides of `lm` (layers, hidden, ...)."""
    from transformers import LlamaConfig

    shape = dict(dict(LLAMA_7B, heads=32), **lm)
    return LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], vocab_size=32064, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llava_reduced(device: str, lm: dict, vision_overrides: dict):
    """LLaVA-1.5-7B's shape (CLIP-L/14-336 tower, LLaMA-7B width) at the depth given in `lm`, random weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text, vision = llama_config(lm), clip_config(vision_overrides)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         attn_implementation="sdpa")
    return LlavaForConditionalGeneration(config).to(device).eval()


def llava_prompt(model, text_tokens: int, device: str) -> dict:
    """One image's 576 placeholders between text tokens, and its pixels: the inputs of one prefill."""
    g = torch.Generator().manual_seed(0)
    vision = model.config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    before = torch.randint(3, 32000, (text_tokens // 2,), generator=g)
    after = torch.randint(3, 32000, (text_tokens - text_tokens // 2,), generator=g)
    ids = torch.cat([torch.tensor([1]), before, torch.full((n,), IMAGE_TOKEN), after])[None]
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device)}


def prefill(model, inputs: dict, budget):
    """One prefill (logits of the last position only, as generate computes them), pruned to `budget` when given."""
    if budget is not None:
        hiprune_ops.apply_hiprune(model, budget=budget)
    try:
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1).logits
    finally:
        if budget is not None:
            hiprune_ops.remove_hiprune(model)


def llava_7b_prefill_flops(visual_tokens: int, text_tokens: int) -> float:
    return prefill_flops(visual_tokens + text_tokens, **LLAMA_7B)
