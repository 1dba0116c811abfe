"""The one benchmark harness: timings of several candidates taken side by side in one run, reported as ratios.

Absolute CPU times vary with the machine; the ratios against a baseline measured in the same run are what the
benchmarks report. Every table names the device it ran on.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from hiprune_ops._report import device_description as device_name  # noqa: F401 (re-exported)
from hiprune_ops._report import format_table  # noqa: F401 (re-exported)
from hiprune_ops._report import synchronize as _sync



def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, repeat: int = 7,
            min_time: float = 0.0) -> float:
    """Median seconds of one call of fn (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    gc.collect()
    return statistics.median(times)


def compare(candidates: dict[str, Callable[[], object]], baseline: str, *, device: str = "cpu",
            rounds: int = 3, **kwargs) -> dict[str, float]:
    """Times every candidate in interleaved rounds (so drift hits all alike); returns median seconds each."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(measure(fn, device=device, **kwargs))
    result = {name: statistics.median(values) for name, values in samples.items()}
    if baseline not in result:
        raise KeyError(f"baseline {baseline!r} is not a candidate")
    return result
