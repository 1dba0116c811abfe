"""qk_scores against the dense map and against one SDPA forward: time and extra peak memory, H = 16, D = 80.

Memory: each (L, candidate) runs once in a fresh subprocess. It makes q, k, v, warms the candidate up on a tiny
input (threads, BLAS buffers), returns freed heap to the OS (malloc_trim), resets the peak resident size
(/proc/self/clear_refs) and reads VmRSS; after one call it reads VmHWM. Extra peak = VmHWM - VmRSS before the
call: everything the call touched beyond the inputs, its output included. Linux only.
Time: qk_scores and SDPA (and the dense computation where it fits) timed side by side in one subprocess per L
with harness.compare, reported as ratios to SDPA.

    python benchmarks/bench_qk_scores.py                      # L = 1024 .. 16384 (long: minutes per large L)
    python benchmarks/bench_qk_scores.py --lengths 1024 2048  # a subset
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import compare, device_name, format_table  # noqa: E402

HEADS, DIM = 16, 80
LENGTHS = (1024, 2048, 4096, 8192, 16384)
GIB = 2**30
# The dense computation holds two (H, L, L) float32 maps at once (logits, then probabilities).
DENSE_BUDGET = 20 * GIB


def dense_bytes(length: int) -> int:
    return 2 * HEADS * length * length * 4


def make_inputs(length: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(length)
    return tuple(torch.randn(1, HEADS, length, DIM, generator=g).to(dtype) for _ in range(3))


def candidates(q, k, v):
    import hiprune_ops

    scale = DIM ** -0.5
    return {
        "qk_scores": lambda: hiprune_ops.qk_scores(q, k, scale, backend="cpp"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "dense": lambda: hiprune_ops.attention_scores(torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1),
                                                      backend="cpp"),
    }


def _status() -> dict:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def measure_memory(length: int, name: str) -> dict:
    q, k, v = make_inputs(length)
    candidates(*make_inputs(64))[name]()  # warm-up: thread pool, BLAS buffers
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current VmRSS
    before = _status()["VmRSS"]
    out = candidates(q, k, v)[name]()
    peak = _status()["VmHWM"]
    del out
    return {"extra_peak": peak - before, "inputs": 3 * q.numel() * q.element_size()}


def measure_time(length: int, with_dense: bool) -> dict:
    q, k, v = make_inputs(length)
    fns = candidates(q, k, v)
    if not with_dense:
        del fns["dense"]
    big = length >= 8192
    # Large L take seconds per call on a small CPU: fewer samples there.
    return compare(fns, "sdpa", rounds=2 if big else 3, warmup=1, repeat=1 if big else 3)


def _child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True, capture_output=True,
                            text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--child-memory", nargs=2, metavar=("L", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--child-time", nargs=2, metavar=("L", "DENSE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(measure_memory(int(args.child_memory[0]), args.child_memory[1])))
        return
    if args.child_time:
        print(json.dumps(measure_time(int(args.child_time[0]), args.child_time[1] == "1")))
        return

    thread_args = ["--threads", str(args.threads)] if args.threads else []
    rows, records = [], []
    for length in args.lengths:
        with_dense = dense_bytes(length) <= DENSE_BUDGET
        names = ["qk_scores", "sdpa"] + (["dense"] if with_dense else [])
        memory = {name: _child(["--child-memory", str(length), name, *thread_args]) for name in names}
        times = _child(["--child-time", str(length), "1" if with_dense else "0", *thread_args])
        map_bytes = HEADS * length * length * 4  # one float32 (H, L, L) map
        record = {"L": length, "map_bytes": map_bytes, "times_s": times,
                  "extra_peak_bytes": {n: m["extra_peak"] for n, m in memory.items()},
                  "inputs_bytes": memory["qk_scores"]["inputs"]}
        records.append(record)
        qk_peak = memory["qk_scores"]["extra_peak"]
        rows.append([length, times["qk_scores"], times["sdpa"], times.get("dense", "n/a (does not fit)"),
                     times["qk_scores"] / times["sdpa"], qk_peak / 2**20, memory["sdpa"]["extra_peak"] / 2**20,
                     memory["dense"]["extra_peak"] / 2**20 if with_dense else "n/a",
                     f"{100 * qk_peak / map_bytes:.3f}%"])
        print(f"L = {length} done", file=sys.stderr, flush=True)

    device = device_name("cpu") if not args.threads else device_name("cpu").replace(
        f"{torch.get_num_threads()} threads", f"{args.threads} threads")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown")
    print(f"CPU model: {model}; torch {torch.__version__}")
    print(format_table(
        f"qk_scores vs SDPA forward vs dense map, B = 1, H = {HEADS}, D = {DIM}, float32, on {device}",
        ["L", "qk_scores s", "sdpa s", "dense s", "qk/sdpa", "qk extra MiB", "sdpa extra MiB", "dense extra MiB",
         "qk extra / map"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "heads": HEADS, "dim": DIM, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
