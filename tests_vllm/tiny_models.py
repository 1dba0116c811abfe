"""Tiny random LLaVA-1.5 and Qwen2.5-VL checkpoints, built offline from configs, that vLLM loads like real ones.

Sizes respect vLLM's CPU kernels (head_dim 32). Two fixes make transformers' output loadable by vLLM 0.32:
transformers 5 saves LLaVA's CLIP tower without its `vision_model.` level, which vLLM's loader expects; and a
Qwen2.5-VL processor needs a video processor to be saved.
"""

from __future__ import annotations

import os

import torch
import transformers
from safetensors.torch import load_file, save_file

LLAVA_IMAGE = 127
LLAVA_GRID = 8          # 112 px / 14 px patches
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 151, 152, 150, 153
QWEN_IMAGE_SIZE = (168, 112)   # height, width in pixels: 12 x 8 patches -> 6 x 4 merged tokens
WORDS = "user assistant : describe the picture please what is this a an of in on and".split()


def _tokenizer(special: dict[str, int], vocab_size: int, **named):
    import tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    vocab.update({f"w{i}": i for i in range(4 + len(WORDS), vocab_size) if i not in special.values()})
    vocab.update(special)
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", **named)


def _fix_llava_tower_keys(path: str) -> None:
    for name in os.listdir(path):
        if not name.endswith(".safetensors"):
            continue
        file = os.path.join(path, name)
        renamed = {}
        for key, tensor in load_file(file).items():
            head, sep, tail = key.partition("vision_tower.")
            if sep and head in ("", "model.") and not tail.startswith("vision_model."):
                key = f"{head}vision_tower.vision_model.{tail}"
            renamed[key] = tensor
        save_file(renamed, file, metadata={"format": "pt"})


def build_llava(path: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=112, patch_size=14, projection_dim=64)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=128, max_position_embeddings=1024,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      torch_dtype="float32")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    _fix_llava_tower_keys(path)
    tokenizer = _tokenizer({"<image>": LLAVA_IMAGE}, 128, extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 112},
                                                      crop_size={"height": 112, "width": 112})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    return path


def build_qwen(path: str, seed: int = 1) -> str:
    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=160, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e4},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, torch_dtype="float32")
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    special = {"<|vision_start|>": QWEN_START, "<|image_pad|>": QWEN_IMAGE, "<|video_pad|>": QWEN_VIDEO,
               "<|vision_end|>": QWEN_END}
    tokenizer = _tokenizer(special, 160, extra_special_tokens={"image_token": "<|image_pad|>",
                                                               "video_token": "<|video_pad|>"})
    pixels = QWEN_IMAGE_SIZE[0] * QWEN_IMAGE_SIZE[1]
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=pixels, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    video_processor = transformers.Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=pixels, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    processor = transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                 video_processor=video_processor)
    processor.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    build_llava(os.path.join(sys.argv[1], "llava"))
    build_qwen(os.path.join(sys.argv[1], "qwen"))
