"""GPU timings of the CUDA kernels against the pure-torch reference on the same GPU, LLaVA-1.5 shapes.

Run on a machine with a CUDA device: `python benchmarks/bench_cuda.py`. Without one it says so and exits.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import compare, device_name, format_table  # noqa: E402

import hiprune_ops  # noqa: E402
from hiprune_ops import reference  # noqa: E402
from hiprune_ops.backend import has_cpp_kernel  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available() or not has_cpp_kernel("select", "cuda"):
        print("bench_cuda: no CUDA device or no CUDA kernels in this build; nothing to measure")
        return
    device = "cuda"
    rows = []
    heads, length, grid = 16, 577, 24  # CLIP ViT-L/14-336: 1 CLS + 24 x 24 patches
    for batch in (1, 8):
        for dtype in (torch.float16, torch.float32):
            g = torch.Generator(device=device).manual_seed(batch)
            object_attn = torch.softmax(torch.randn(batch, heads, length, length, device=device, generator=g), -1)
            deep_attn = torch.softmax(torch.randn(batch, heads, length, length, device=device, generator=g), -1)
            object_attn, deep_attn = object_attn.to(dtype), deep_attn.to(dtype)
            args = (object_attn, deep_attn, 64, grid, grid, 0.1, 1)
            scores = (reference.attention_scores(object_attn, 1), reference.attention_scores(deep_attn, 1))
            candidates = {
                "torch select (maps)": lambda: reference.select(*args),
                "cuda select (maps)": lambda: hiprune_ops.select(*args, backend="cpp"),
                "torch select (scores)": lambda: reference.select(scores[0], scores[1], 64, grid, grid),
                "cuda select (scores)": lambda: hiprune_ops.select(scores[0], scores[1], 64, grid, grid,
                                                                   backend="cpp"),
                "torch attention_scores": lambda: reference.attention_scores(object_attn, 1),
                "cuda attention_scores": lambda: hiprune_ops.attention_scores(object_attn, 1, backend="cpp"),
            }
            times = compare(candidates, "torch select (maps)", device=device, warmup=3, repeat=20)
            for name, seconds in times.items():
                base = times[name.replace("cuda", "torch")]
                rows.append([batch, str(dtype).replace("torch.", ""), name, seconds * 1e6, base / seconds])
    print(format_table(f"HiPrune CUDA kernels vs torch reference, {device_name(device)} (B, 16 heads, L=577)",
                       ["B", "dtype", "candidate", "median us", "speed-up vs torch"], rows))


if __name__ == "__main__":
    main()
