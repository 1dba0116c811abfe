"""hiprune select on LLaVA-1.5-shaped maps, against streaming the same two maps once and against the reference.

Reports, measured side by side in one run:
  select / stream   the fused C++ op against `a.sum() + b.sum()` (the memory-bandwidth floor of reading both maps)
  reference / select  the pure-torch reference against the fused op
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import compare, device_name, format_table  # noqa: E402

import hiprune_ops  # noqa: E402
from hiprune_ops import reference  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--grid", type=int, default=24)
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="cpp,torch", help="comma-separated hiprune backends to time")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    length = args.grid * args.grid + 1
    shape = (args.batch, args.heads, length, length)
    g = torch.Generator().manual_seed(0)
    obj = torch.rand(shape, generator=g).to(device=args.device, dtype=dtype)
    deep = torch.rand(shape, generator=g).to(device=args.device, dtype=dtype)
    select_args = (args.budget, args.grid, args.grid, 0.1, 1)

    candidates = {"stream a.sum() + b.sum()": lambda: obj.sum() + deep.sum()}
    for backend in args.backends.split(","):
        candidates[f"select ({backend})"] = (
            lambda backend=backend: hiprune_ops.select(obj, deep, *select_args, backend=backend))
    if "torch" in args.backends.split(","):
        # the reference is also the check: every timed backend must agree with it
        expected = reference.select(obj, deep, *select_args)
        for backend in args.backends.split(","):
            assert torch.equal(hiprune_ops.select(obj, deep, *select_args, backend=backend), expected), backend

    times = compare(candidates, "stream a.sum() + b.sum()", device=args.device, rounds=args.rounds)
    stream = times["stream a.sum() + b.sum()"]
    gbytes = 2 * obj.numel() * obj.element_size() / 1e9
    rows = [[name, t * 1e3, gbytes / t, t / stream] for name, t in times.items()]
    print(format_table(f"select on 2 x {tuple(shape)} {args.dtype} maps, budget {args.budget}, "
                       f"on {device_name(args.device)}",
                       ["candidate", "ms", "GB/s", "x stream"], rows))


if __name__ == "__main__":
    main()
