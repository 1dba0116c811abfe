"""Encoder + HiPrune selection vs an unpatched SDPA pass, on the same CLIP ViT-L/14-336-shaped encoder.

Both candidates run the same randomly initialised encoder (SDPA attention) on the same image batch. The pruned one
also scores two layers from their q and k (hiprune_ops.qk_scores) and runs select_with_roles + the gather. The
ratio is what to read; absolute times depend on the machine. Usage:
    python benchmarks/bench_encoder.py [--device cpu|cuda] [--batch 1] [--size vit-l-336|tiny] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import compare, device_name, format_table  # noqa: E402

from hiprune_ops.backend import resolve  # noqa: E402
from hiprune_ops.cli import SIZES  # noqa: E402
from hiprune_ops.integrations import HiPruneVisionTower  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", choices=sorted(SIZES), default="vit-l-336")
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args()

    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = CLIPVisionConfig(**SIZES[args.size], attn_implementation="sdpa")
    encoder = CLIPVisionModel(config).to(device=args.device, dtype=dtype).eval()
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, device=args.device, dtype=dtype)
    pruned = HiPruneVisionTower(encoder, args.budget, deep_layer=-2)
    tower = pruned._tower

    def baseline():
        if pruned._marked:  # the unpatched pass runs with no capture at all
            tower.detach(pruned._marked)
            pruned._marked = []
        return encoder(pixel_values=pixels)

    def hiprune():
        if not pruned._marked:
            pruned._marked = tower.attach((pruned.object_layer, pruned.deep_layer))
        return pruned.encode(pixels)

    with torch.inference_mode():
        times = compare({"unpatched SDPA pass": baseline, "encoder + HiPrune selection": hiprune},
                        "unpatched SDPA pass", device=args.device, rounds=args.rounds, warmup=args.warmup,
                        repeat=args.repeat)
    pruned.remove()
    base = times["unpatched SDPA pass"]
    rows = [[name, f"{t * 1e3:.1f}", f"{t / base:.3f}"] for name, t in times.items()]
    grid = config.image_size // config.patch_size
    title = (f"{args.size} encoder ({config.num_hidden_layers} layers, {grid * grid} + 1 tokens), batch {args.batch}, "
             f"{args.dtype}, budget {args.budget}, qk_scores backend: {resolve(None, 'qk_scores', pixels.device)}, "
             f"select backend: {resolve(None, 'select_with_roles', pixels.device)}; device: {device_name(args.device)}")
    print(format_table(title, ["candidate", "median ms", "ratio"], rows))
    print(f"encoder + selection / unpatched SDPA pass: {times['encoder + HiPrune selection'] / base:.3f}x")


if __name__ == "__main__":
    main()
