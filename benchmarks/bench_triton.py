"""Triton backend vs the torch reference on one CUDA device, at LLaVA-1.5 shapes (24 x 24 grid, 1 CLS, 16 heads).

    python benchmarks/bench_triton.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare, device_name, format_table  # noqa: E402

import hiprune_ops.triton_kernels  # noqa: E402,F401
from hiprune_ops import reference  # noqa: E402


def main() -> None:
    device = "cuda"
    ops = torch.ops.hiprune_triton
    rows = []
    for batch in (1, 8):
        g = torch.Generator(device=device).manual_seed(0)
        maps = [torch.softmax(torch.randn(batch, 16, 577, 577, device=device, generator=g), -1).half()
                for _ in range(2)]
        features = torch.randn(batch, 576, 1024, device=device, dtype=torch.half, generator=g)
        cases = {
            "attention_scores": {"torch": lambda: reference.attention_scores(maps[0], 1),
                                 "triton": lambda: ops.attention_scores(maps[0], 1)},
            "select (maps, budget 64)": {"torch": lambda: reference.select(maps[0], maps[1], 64, 24, 24, 0.1, 1),
                                         "triton": lambda: ops.select(maps[0], maps[1], 64, 24, 24, 0.1, 1)},
            "prune (maps, budget 192)": {
                "torch": lambda: reference.prune(features, maps[0], maps[1], 192, 24, 24, 0.1, 1),
                "triton": lambda: ops.prune(features, maps[0], maps[1], 192, 24, 24, 0.1, 1)},
        }
        q, k = (torch.randn(batch, 16, 577, 64, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        cases["qk_scores (L 577, D 64)"] = {
            "torch dense fp32": lambda: torch.softmax(q.float() @ k.float().mT * 0.125, -1)[..., 1:].mean((1, 2)),
            "triton": lambda: ops.qk_scores(q, k, 0.125, 1)}
        for name, candidates in cases.items():
            times = compare(candidates, baseline=next(iter(candidates)), device=device)
            base = next(iter(times.values()))
            rows += [(name, batch, cand, t * 1e6, base / t) for cand, t in times.items()]
    print(format_table(f"Triton backend on {device_name(device)} (median us; speed-up vs the first row)",
                       ["op", "batch", "candidate", "us", "speed-up"], rows))


if __name__ == "__main__":
    main()
