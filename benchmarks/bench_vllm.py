"""Time to first token through vLLM: dense against HiPrune at 192 / 128 / 64 tokens, on a LLaVA-1.5-shaped model.

The model has full-width layers (CLIP ViT-L/14-336 tower, LLaMA-7B language model) and reduced depth, random
weights, built offline into a temporary folder. One engine serves every candidate (the plugin with a server default
of 0 = dense; each candidate is a per-request hiprune_budget), prefix caching and the processor cache off, so every
request encodes its image and prefills its whole prompt. TTFT = the wall time of one request generating one token.
Every candidate is warmed up by one request, then timed in interleaved rounds (dense, 192, 128, 64, dense, ...):
TTFT is the median over the rounds with its range, a speed-up the median of the per-round speed-ups (dense over
the candidate in the same round) with its range, and a note flags a range over 10% (hiprune_ops/_timing.py).
The FLOPs prediction counts the matmuls of the encoder, the projector and the language model's prefill (causal
attention included) for the same shapes. Runs in the vLLM venv (`make test-vllm` creates it):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--vision-layers 4] [--text-layers 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests_vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from harness import device_slug, environment, format_table  # noqa: E402

VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32064)
PROMPT = "user : <image> describe the picture please what is this"


def build(path: str, vision_layers: int, text_layers: int, dtype: str) -> str:
    import torch
    import transformers
    import tiny_models

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(num_hidden_layers=vision_layers, projection_dim=768, **VISION)
    text = transformers.LlamaConfig(num_hidden_layers=text_layers, max_position_embeddings=4096, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **TEXT)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      torch_dtype=dtype)
    with torch.device("cpu"):
        model = transformers.LlavaForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    del model
    tiny_models._fix_llava_tower_keys(path)
    tokenizer = tiny_models._tokenizer({"<image>": 32000}, 32064, extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                vision_feature_select_strategy="default",
                                num_additional_image_tokens=1).save_pretrained(path)
    return path


def prefill_flops(image_tokens: int, text_tokens: int, vision_layers: int, text_layers: int) -> float:
    d_v, f_v = VISION["hidden_size"], VISION["intermediate_size"]
    grid = VISION["image_size"] // VISION["patch_size"]
    l_v = grid * grid + 1
    built = vision_layers - 1  # vision_feature_layer -2: vLLM builds the tower up to it
    encoder = built * (2 * l_v * (4 * d_v * d_v + 2 * d_v * f_v) + 4 * l_v * l_v * d_v)
    d, f = TEXT["hidden_size"], TEXT["intermediate_size"]
    projector = 2 * image_tokens * (d_v * d + d * d)
    length = image_tokens + text_tokens
    language = text_layers * (2 * length * (4 * d * d + 3 * d * f) + 2 * length * length * d)
    return encoder + projector + language + 2 * d * TEXT["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up request each "
                        "(default 5)")
    parser.add_argument("--output", default=None, help="results folder (default benchmarks/results/<device>)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    import numpy as np
    from PIL import Image
    import vllm
    from vllm import LLM, SamplingParams

    from hiprune_ops import _timing
    from hiprune_ops._report import device_description

    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        path = build(folder, args.vision_layers, args.text_layers, args.dtype)
        llm = LLM(model=path, dtype=args.dtype, max_model_len=1024, max_num_seqs=1, enable_prefix_caching=False,
                  mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 1}, enforce_eager=True,
                  hf_overrides={"hiprune": {"budget": 0}}, seed=0)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
        params = SamplingParams(temperature=0.0, max_tokens=1)
        prompt_lengths = {}

        def request(budget):
            def run():
                out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image},
                                    "mm_processor_kwargs": {"hiprune_budget": budget}}, params, use_tqdm=False)
                prompt_lengths[budget] = len(out[0].prompt_token_ids)
            return run

        names = {0: "dense (576)"} | {b: f"HiPrune {b}" for b in budgets}
        samples = _timing.interleaved_times({names[b]: request(b) for b in names}, rounds=args.rounds, warmup=1)
    dense_len = prompt_lengths[0]
    text_tokens = dense_len - 576
    dense_flops = prefill_flops(576, text_tokens, args.vision_layers, args.text_layers)
    rows, results, notes = [], [], []
    for budget, name in names.items():
        kept = 576 if budget == 0 else budget
        ttft = _timing.Spread.of(samples[name])
        speedup = _timing.Spread.of([dense / ours for dense, ours in zip(samples[names[0]], samples[name])])
        predicted = dense_flops / prefill_flops(kept, text_tokens, args.vision_layers, args.text_layers)
        rows.append([name, str(prompt_lengths[budget]), f"{ttft.median * 1e3:.0f}",
                     f"{ttft.low * 1e3:.0f} to {ttft.high * 1e3:.0f}", f"{prompt_lengths[budget] / ttft.median:.0f}",
                     f"{speedup.median:.2f}", "-" if budget == 0 else f"{speedup.low:.2f} to {speedup.high:.2f}",
                     f"{predicted:.2f}", f"{speedup.median / predicted:.2f}"])
        results.append(dict(candidate=name, prompt_tokens=prompt_lengths[budget], ttft_s=ttft.median,
                            ttft_range_s=[ttft.low, ttft.high], speedup=speedup.median,
                            speedup_range=[speedup.low, speedup.high], rounds=ttft.rounds, flops_speedup=predicted))
        if budget and speedup.note():
            notes.append(f"note: {name} speed-up: {speedup.note()}")
    env = environment("cpu")
    env["vllm"] = vllm.__version__
    title = (f"vLLM TTFT, LLaVA-1.5-shaped ({args.vision_layers}-layer ViT-L/14-336 width, {args.text_layers}-layer "
             f"LLaMA-7B width), {args.dtype}, random weights; device: {device_description('cpu')}; median and range "
             f"of {args.rounds} interleaved rounds after 1 warm-up request each")
    table = format_table(title, ["candidate", "prompt tokens", "TTFT ms", "TTFT range ms", "prefill tok/s",
                                 "speed-up", "speed-up range", "FLOPs speed-up", "speed-up / FLOPs'"], rows)
    table = "\n".join([table] + notes)
    print(table)
    folder = args.output or os.path.join(HERE, "results", device_slug("cpu"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vllm_ttft.md"), "w") as file:
        file.write(f"# {__doc__.splitlines()[0]}\n\n")
        file.write("\n".join(f"- {key}: {value}" for key, value in env.items()) + "\n\n" + table + "\n")
    with open(os.path.join(folder, "vllm_ttft.json"), "w") as file:
        json.dump({"environment": env, "title": title, "results": results}, file, indent=1)
    print(f"written: {folder}/vllm_ttft.md, .json")


if __name__ == "__main__":
    main()
