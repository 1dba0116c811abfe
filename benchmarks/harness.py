"""Timing and memory of benchmark candidates, taken side by side in one process, and the run's environment.

Times: every candidate of a case is warmed up, then timed in interleaved rounds (so drift from other jobs hits all
alike), by the rule every printed timing follows (hiprune_ops/_timing.py); the samples give the median and the
interquartile range, each round's median gives the per-round ratios. GPU: CUDA events; CPU: perf_counter.
Memory: extra peak of one call = peak during the call minus what was resident (CPU) or allocated (GPU) before it,
so the inputs and the model are not counted and the output is. CPU: Linux VmHWM after resetting it through
/proc/self/clear_refs, freed heap first returned to the OS (malloc_trim); GPU: torch.cuda.max_memory_allocated.
On glibc the measured call runs with a fixed mmap threshold of 128 KiB: every larger buffer gets its own mapping
and goes back to the OS when freed, so VmHWM follows the memory the call holds. Under glibc's default (a threshold
that rises to the largest freed buffer, up to 32 MiB) buffers land in the heap, freed ones stay resident in
fragments: the same warm call of the CLIP-L/14-336 tower measured 132 to 181 MiB; pinned, 85.7 to 85.9 MiB.
After the call the thresholds are left at the values that heuristic ends at (32 MiB, trim 64 MiB).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

from hiprune_ops._report import device_description as device_name  # noqa: F401 (for one-off scripts)
from hiprune_ops._report import format_table  # noqa: F401 (for one-off scripts)
from hiprune_ops import _timing as timing
from hiprune_ops._report import synchronize


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_candidates(candidates: dict[str, Callable[[], object]], device: str, *, warmup: int, repeat: int,
                    rounds: int, on_round: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate: `rounds` interleaved rounds of `repeat` calls, after `warmup` calls;
    `on_round()` runs after each round."""
    samples = timing.interleaved_times(candidates, rounds=rounds, warmup=warmup, calls_per_round=repeat,
                                       timer=lambda fn: _time_once(fn, device),
                                       on_round=(lambda *_: on_round()) if on_round is not None else None)
    gc.collect()
    return samples


def median_iqr(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of the samples; IQR 0 for fewer than 2 samples."""
    median = statistics.median(samples)
    if len(samples) < 2:
        return median, 0.0
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return median, quartiles[2] - quartiles[0]


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and platform.system() == "Linux"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MEASURE_MMAP_THRESHOLD = 128 * 1024
_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024


def _set_malloc_thresholds(libc, mmap_threshold: int) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)


def extra_peak_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Extra peak memory of one call of fn (see the module docstring); None where it cannot be measured."""
    gc.collect()
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
        del out
        return peak - before
    if not cpu_peak_supported():
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        _set_malloc_thresholds(libc, _MEASURE_MMAP_THRESHOLD)
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
    except OSError:
        return None
    try:
        before = _proc_status("VmRSS")
        out = fn()
        peak = _proc_status("VmHWM")
        del out
    finally:
        _set_malloc_thresholds(libc, _SETTLED_MMAP_THRESHOLD)
    return peak - before


def _git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, str]:
    """What every results file records: the device, CPU/GPU model, versions, threads, git revision, time."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import hiprune_ops
    from hiprune_ops.backend import extension_loaded

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "none"
    return {
        "device": device,
        "cpu": _cpu_model(),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "hiprune_ops": hiprune_ops.__version__ + ("" if extension_loaded() else " (no C++ extension)"),
        "threads": str(torch.get_num_threads()),
        "cpu_count": str(os.cpu_count()),
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def device_slug(device: str) -> str:
    """Folder name of a device's results, e.g. cpu-amd-epyc-9454-2t or cuda-nvidia-h100-80gb-hbm3."""
    env = environment(device)
    name = env["gpu"] if device.startswith("cuda") else env["cpu"]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    slug = "-".join(part for part in slug.split("-") if part and part not in ("processor", "core", "r", "tm"))
    prefix = "cuda" if device.startswith("cuda") else "cpu"
    suffix = "" if device.startswith("cuda") else f"-{env['threads']}t"
    return f"{prefix}-{slug[:40]}{suffix}"


def compare(candidates: dict[str, Callable[[], object]], baseline: str, *, device: str = "cpu", rounds: int = 3,
            warmup: int = 2, repeat: int = 7) -> tuple[dict[str, float], dict[str, timing.Spread]]:
    """For one-off scripts (the suite uses time_candidates): each candidate's median seconds, and its time over the
    baseline's per round, as a median with its range (the baseline left out)."""
    if baseline not in candidates:
        raise KeyError(f"baseline {baseline!r} is not a candidate")
    samples = time_candidates(candidates, device, warmup=warmup, repeat=repeat, rounds=rounds)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return medians, timing.ratios(samples, baseline, calls_per_round=repeat)
