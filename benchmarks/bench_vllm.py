"""Time to first token through vLLM: dense against HiPrune, on a LLaVA-1.5-shaped or a Qwen3-VL-shaped model.

`--model llava` (default): CLIP ViT-L/14-336 tower and LLaMA-7B language model at full width, 4 and 2 layers, one
336 px image (576 tokens) at 192 / 128 / 64 kept tokens. `--model qwen3_vl`: Qwen3-VL-4B's tower at full width and
depth (24 blocks of 1024, deepstack after blocks 5, 11, 17) and its language model at full width (2560) with 4
layers, one 1600 x 1600 px image (100 x 100 patches, 2,500 merged tokens) at ratios 1.0, 0.33 and 0.11. Random
weights, built offline into a temporary folder (Qwen3-VL: tests_vllm/tiny_families.py's tokenizer and processor).
One engine serves every candidate (the plugin with a server default of 0 = dense; each candidate is a per-request
hiprune_budget or hiprune_ratio), prefix caching and the processor cache off, so every request encodes its image
and prefills its whole prompt, in one step. TTFT = the wall time of one request generating one token.
Every candidate is warmed up by one request, then timed in interleaved rounds (dense, then each pruned candidate,
then dense again, ...): TTFT is the median over the rounds with its range, a speed-up the median of the per-round
speed-ups (dense over the candidate in the same round) with its range, and a note flags a range over 10%
(hiprune_ops/_timing.py). The FLOPs prediction counts the matmuls of the encoder (Qwen3-VL: its patch embedding,
full attention and MLPs, its mergers, and HiPrune's scoring: two layers' q.k products, twice, for a pruned
request), the projector and the language model's prefill (causal attention included) for the kept tokens each
request's prompt shows. Runs in the vLLM venv (`make test-vllm` creates it):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--model llava|qwen3_vl] [--rounds 5] [--image-size 1600]
Results: benchmarks/results/<device>/vllm_ttft.md and .json (llava), vllm_ttft_qwen3_vl.md and .json (qwen3_vl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests_vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM's CPU worker binds its threads to all cores but one by default (that one kept for its scheduler): one thread
# on a 2-core box. Here every allowed core serves the request, as the scheduler idles while a request runs.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))))
# One 2,500-token request takes minutes on a loaded 2-core box: past vLLM's 300 s limit on one model step, which
# kills the engine.
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")

from harness import device_slug, environment, format_table  # noqa: E402

VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32064)
PROMPT = "user : <image> describe the picture please what is this"
LLAVA_IMAGE = 32000

# Qwen3-VL-4B-Instruct as released: its tower (shared with the 2B) and its language model's widths.
QWEN3_VL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[5, 11, 17])
QWEN3_VL_TEXT = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True, "rope_theta": 5e6},
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(path: str, vision_layers: int, text_layers: int, dtype: str) -> str:
    """The LLaVA-1.5-shaped checkpoint (bench_vllm_serve.py serves it too)."""
    import torch
    import transformers
    import tiny_models

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(num_hidden_layers=vision_layers, projection_dim=768, **VISION)
    text = transformers.LlamaConfig(num_hidden_layers=text_layers, max_position_embeddings=4096, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **TEXT)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      torch_dtype=dtype)
    with torch.device("cpu"):
        model = transformers.LlavaForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    del model
    tiny_models._fix_llava_tower_keys(path)
    tokenizer = tiny_models._tokenizer({"<image>": LLAVA_IMAGE}, 32064,
                                       extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                vision_feature_select_strategy="default",
                                num_additional_image_tokens=1).save_pretrained(path)
    return path


def llava_flops(image_tokens: int, text_tokens: int, args) -> float:
    d_v, f_v = VISION["hidden_size"], VISION["intermediate_size"]
    grid = VISION["image_size"] // VISION["patch_size"]
    l_v = grid * grid + 1
    built = args.vision_layers - 1  # vision_feature_layer -2: vLLM builds the tower up to it
    encoder = built * (2 * l_v * (4 * d_v * d_v + 2 * d_v * f_v) + 4 * l_v * l_v * d_v)
    d, f = TEXT["hidden_size"], TEXT["intermediate_size"]
    projector = 2 * image_tokens * (d_v * d + d * d)
    return encoder + projector + language_flops(image_tokens + text_tokens, args.text_layers, d, f, d, d,
                                                TEXT["vocab_size"])


def language_flops(length: int, layers: int, d: int, f: int, q_width: int, kv_width: int, vocab: int) -> float:
    """Prefill of `length` tokens: q, k, v, o projections, causal attention, gated MLP; one token's logits."""
    projections = 2 * length * (2 * d * q_width + 2 * d * kv_width + 3 * d * f)
    return layers * (projections + 2 * length * length * q_width) + 2 * d * vocab


def build_qwen3_vl(path: str, vision_layers: int, text_layers: int, dtype: str, image_size: int) -> str:
    import torch
    import transformers
    import tiny_families

    torch.manual_seed(0)
    vision = dict(QWEN3_VL_VISION, depth=vision_layers, deepstack_visual_indexes=qwen3_vl_deepstack(vision_layers))
    config = transformers.Qwen3VLConfig(vision_config=vision,
                                        text_config=dict(QWEN3_VL_TEXT, num_hidden_layers=text_layers),
                                        tie_word_embeddings=True, torch_dtype=dtype, **tiny_families.QWEN_IDS)
    with torch.device("cpu"):
        model = transformers.Qwen3VLForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    del model
    tiny_families._qwen_processor(transformers.Qwen3VLProcessor, transformers.Qwen3VLVideoProcessor,
                                  QWEN3_VL_VISION["patch_size"], (image_size, image_size)).save_pretrained(path)
    return path


def qwen3_vl_deepstack(depth: int) -> list[int]:
    """The released deepstack blocks (5, 11, 17 of 24), at the same relative depths for a shorter tower."""
    return [round(i * depth / QWEN3_VL_VISION["depth"]) for i in QWEN3_VL_VISION["deepstack_visual_indexes"]]


def qwen3_vl_flops(image_tokens: int, text_tokens: int, args) -> float:
    v = QWEN3_VL_VISION
    d_v, f_v, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    unit = v["spatial_merge_size"] ** 2
    merged = (args.image_size // (v["patch_size"] * v["spatial_merge_size"])) ** 2
    patches = merged * unit
    embedding = 2 * patches * (3 * v["temporal_patch_size"] * v["patch_size"] ** 2) * d_v
    blocks = args.vision_layers * (2 * patches * (4 * d_v * d_v + 2 * d_v * f_v) + 4 * patches * patches * d_v)
    # The main merger and one per deepstack level: (unit * d_v -> unit * d_v -> out) per merged token.
    mergers = (1 + len(v["deepstack_visual_indexes"])) * 2 * merged * unit * d_v * (unit * d_v + out)
    # vLLM's packed ViT attention gives no log-sum-exp: qk_scores takes two passes over q.k in each scored layer.
    scoring = 2 * 2 * (2 * patches * patches * d_v) if image_tokens < merged else 0
    t = QWEN3_VL_TEXT
    heads_width = t["num_attention_heads"] * t["head_dim"]
    language = language_flops(image_tokens + text_tokens, args.text_layers, t["hidden_size"],
                              t["intermediate_size"], heads_width, t["num_key_value_heads"] * t["head_dim"],
                              t["vocab_size"])
    return embedding + blocks + mergers + scoring + language


@dataclass(frozen=True)
class Shape:
    """One model shape the benchmark serves: how to build it, prompt it and count its work."""
    description: str                                   # for the table's title, formatted with the arguments
    build: Callable[[str, argparse.Namespace], str]
    prompt: str
    image_token: int                                   # the placeholder id counted in each prompt
    flops: Callable[[int, int, argparse.Namespace], float]
    candidates: Callable[[argparse.Namespace], dict]   # name -> mm_processor_kwargs, dense first
    engine: dict
    results: str                                       # results file name, without extension
    image_side: Callable[[argparse.Namespace], int]    # the square test image's side in pixels
    vision_layers: int
    text_layers: int


def _budget_candidates(args) -> dict:
    return {"dense (576)": {"hiprune_budget": 0}} | {f"HiPrune {b}": {"hiprune_budget": b} for b in args.budgets}


def _ratio_candidates(args) -> dict:
    return {"dense (ratio 1.0)": {"hiprune_ratio": 1.0}} | {f"HiPrune ratio {r:g}": {"hiprune_ratio": r}
                                                            for r in args.ratios}


SHAPES = {
    "llava": Shape("LLaVA-1.5-shaped ({vision_layers}-layer ViT-L/14-336 width, {text_layers}-layer LLaMA-7B width)",
                   lambda path, args: build(path, args.vision_layers, args.text_layers, args.dtype), PROMPT,
                   LLAVA_IMAGE, llava_flops, _budget_candidates, dict(max_model_len=1024), "vllm_ttft",
                   lambda args: VISION["image_size"], 4, 2),
    "qwen3_vl": Shape("Qwen3-VL-4B-shaped ({vision_layers}-block ViT at width 1024, {text_layers}-layer language model "
                      "at width 2560), one {image_size} x {image_size} px image",
                      lambda path, args: build_qwen3_vl(path, args.vision_layers, args.text_layers, args.dtype,
                                                        args.image_size),
                      "user : <|vision_start|><|image_pad|><|vision_end|> describe the picture please what is this",
                      151, qwen3_vl_flops, _ratio_candidates,
                      dict(max_model_len=4096, max_num_batched_tokens=4096), "vllm_ttft_qwen3_vl",
                      lambda args: args.image_size, 24, 4),
}


def _numbers(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llava")
    parser.add_argument("--vision-layers", type=int, default=None, help="default: llava 4, qwen3_vl 24 (full)")
    parser.add_argument("--text-layers", type=int, default=None, help="default: llava 2, qwen3_vl 4")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--budgets", default="192,128,64", help="llava: kept tokens per pruned candidate")
    parser.add_argument("--ratios", default="0.33,0.11", help="qwen3_vl: kept ratio per pruned candidate")
    parser.add_argument("--image-size", type=int, default=1600, help="qwen3_vl: the square image's side in pixels, "
                        "a multiple of 32 (default 1600: 2,500 merged tokens)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up request each "
                        "(default 5)")
    parser.add_argument("--model-dir", default=None, help="build the checkpoint into this folder once and reuse it "
                        "(default: a temporary folder); it must have been built with the same arguments")
    parser.add_argument("--output", default=None, help="results folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    shape = SHAPES[args.model]
    args.vision_layers = shape.vision_layers if args.vision_layers is None else args.vision_layers
    args.text_layers = shape.text_layers if args.text_layers is None else args.text_layers
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.vision_layers < 2 or args.text_layers < 1:
        parser.error(f"--vision-layers must be >= 2 and --text-layers >= 1, got {args.vision_layers} and "
                     f"{args.text_layers}")
    if args.image_size < 32 or args.image_size % 32:
        parser.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    args.budgets = _numbers(args.budgets, int)
    args.ratios = _numbers(args.ratios, float)
    if any(b < 1 for b in args.budgets):
        parser.error(f"--budgets must be positive, got {args.budgets}")
    if any(not 0.0 < r < 1.0 for r in args.ratios):
        parser.error(f"--ratios must be in (0, 1), got {args.ratios}")
    return args


def main() -> None:
    args = parse_args()
    shape = SHAPES[args.model]

    import numpy as np
    from PIL import Image
    import vllm
    from vllm import LLM, SamplingParams

    from hiprune_ops import _timing
    from hiprune_ops._report import device_description

    candidates = shape.candidates(args)
    dense = next(iter(candidates))
    side = shape.image_side(args)
    load_before = os.getloadavg()
    round_loads = []
    with tempfile.TemporaryDirectory() as folder:
        path = args.model_dir or folder
        if not os.path.exists(os.path.join(path, "config.json")):
            shape.build(path, args)
        llm = LLM(model=path, dtype=args.dtype, max_num_seqs=1, enable_prefix_caching=False, mm_processor_cache_gb=0,
                  limit_mm_per_prompt={"image": 1}, enforce_eager=True, hf_overrides={"hiprune": {"budget": 0}},
                  seed=0, **shape.engine)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        params = SamplingParams(temperature=0.0, max_tokens=1)
        prompts = {}

        def request(name):
            def run():
                out = llm.generate({"prompt": shape.prompt, "multi_modal_data": {"image": image},
                                    "mm_processor_kwargs": candidates[name]}, params, use_tqdm=False)
                prompts[name] = list(out[0].prompt_token_ids)
            return run

        samples = _timing.interleaved_times({name: request(name) for name in candidates}, rounds=args.rounds,
                                            warmup=1, on_round=lambda *_: round_loads.append(os.getloadavg()[0]))
    image_tokens = {name: sum(1 for t in ids if t == shape.image_token) for name, ids in prompts.items()}
    text_tokens = len(prompts[dense]) - image_tokens[dense]
    dense_flops = shape.flops(image_tokens[dense], text_tokens, args)
    rows, results, notes = [], [], []
    for name in candidates:
        length = len(prompts[name])
        ttft = _timing.Spread.of(samples[name])
        speedup = _timing.Spread.of([base / ours for base, ours in zip(samples[dense], samples[name])])
        predicted = dense_flops / shape.flops(image_tokens[name], text_tokens, args)
        rows.append([name, str(length), str(image_tokens[name]), f"{ttft.median * 1e3:.0f}",
                     f"{ttft.low * 1e3:.0f} to {ttft.high * 1e3:.0f}", f"{length / ttft.median:.0f}",
                     f"{speedup.median:.2f}", "-" if name == dense else f"{speedup.low:.2f} to {speedup.high:.2f}",
                     f"{predicted:.2f}", f"{speedup.median / predicted:.2f}"])
        results.append(dict(candidate=name, request=candidates[name], prompt_tokens=length,
                            image_tokens=image_tokens[name], ttft_s=ttft.median, ttft_range_s=[ttft.low, ttft.high],
                            ttft_samples_s=samples[name], speedup=speedup.median,
                            speedup_range=[speedup.low, speedup.high], rounds=ttft.rounds, flops=shape.flops(
                                image_tokens[name], text_tokens, args), flops_speedup=predicted))
        if name != dense and speedup.note():
            notes.append(f"note: {name} speed-up: {speedup.note()}")
    env = environment("cpu")
    env["vllm"] = vllm.__version__
    env["vllm worker cores (VLLM_CPU_OMP_THREADS_BIND)"] = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    env["load average before (1, 5, 15 min)"] = " ".join(f"{x:.2f}" for x in load_before)
    env["load average (1 min) after each round"] = " ".join(f"{x:.2f}" for x in round_loads)
    title = (f"vLLM TTFT, {shape.description.format(**vars(args))}, {args.dtype}, random weights; device: "
             f"{device_description('cpu')}; median and range of {args.rounds} interleaved rounds after 1 warm-up "
             "request each")
    table = format_table(title, ["candidate", "prompt tokens", "image tokens", "TTFT ms", "TTFT range ms",
                                 "prefill tok/s", "speed-up", "speed-up range", "FLOPs speed-up",
                                 "speed-up / FLOPs'"], rows)
    table = "\n".join([table] + notes)
    print(table)
    folder = args.output or os.path.join(HERE, "results", device_slug("cpu"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{shape.results}.md"), "w") as file:
        file.write(f"# {__doc__.splitlines()[0]}\n\n")
        file.write("\n".join(f"- {key}: {value}" for key, value in env.items()) + "\n\n" + table + "\n")
    with open(os.path.join(folder, f"{shape.results}.json"), "w") as file:
        json.dump({"environment": env, "arguments": vars(args), "title": title, "results": results}, file, indent=1)
    print(f"written: {folder}/{shape.results}.md, .json")


if __name__ == "__main__":
    main()
