"""qk_scores with the rows' lse (one pass) and without (two passes), against one SDPA forward, side by side.

The lse comes from the same forward a tapped layer runs (torch's CPU flash kernel returns it), so the cost that
pruning adds to that layer is the qk_scores time. B = 1, H = 16, D = 80, float32 by default.

    python benchmarks/bench_qk_lse.py                       # L = 4096
    python benchmarks/bench_qk_lse.py --lengths 1024 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import compare, device_name, format_table  # noqa: E402

HEADS, DIM = 16, 80


def run(length: int, dtype: torch.dtype, backend: str, rounds: int):
    import hiprune_ops

    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, HEADS, length, DIM, generator=g).to(dtype) for _ in range(3))
    scale = DIM ** -0.5
    lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[1]
    with_lse = hiprune_ops.qk_scores(q, k, scale, lse=lse, backend=backend)
    two_pass = hiprune_ops.qk_scores(q, k, scale, backend=backend)
    torch.testing.assert_close(with_lse, two_pass, rtol=1e-4, atol=1e-9)  # same scores, or the timing means nothing
    return compare({
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "qk_scores, two passes": lambda: hiprune_ops.qk_scores(q, k, scale, backend=backend),
        "qk_scores with lse": lambda: hiprune_ops.qk_scores(q, k, scale, lse=lse, backend=backend),
    }, "sdpa", rounds=rounds, warmup=1, repeat=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    dtype = getattr(torch, args.dtype)
    rows, notes = [], []
    for length in args.lengths:
        times, ratios = run(length, dtype, args.backend, args.rounds)
        for name, seconds in times.items():
            ratio = ratios.get(name)
            rows.append([str(length), name, f"{seconds * 1e3:.1f}", "1x" if ratio is None else f"{ratio.median:.2f}x",
                         "-" if ratio is None else f"{ratio.low:.2f}x to {ratio.high:.2f}x"])
            if ratio is not None and ratio.note():
                notes.append(f"note: L = {length}, {name}: {ratio.note()}")
    title = (f"qk_scores vs one SDPA forward on {device_name('cpu')}, torch {torch.__version__}, "
             f"B = 1, H = {HEADS}, D = {DIM}, {args.dtype}; median and range of {args.rounds} interleaved rounds "
             "(5 calls each) after 1 warm-up call")
    print(format_table(title, ["L", "candidate", "ms (median)", "vs SDPA", "range over rounds"], rows))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
