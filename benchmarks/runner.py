"""Runs cases: builds each case's inputs once, checks its candidates agree, times them side by side, measures the
extra peak memory of one call each, and returns one result row per case and candidate."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Optional

import torch

from . import harness
from .cases import Case, Profile


@dataclass
class Row:
    group: str
    case: str
    candidate: str
    shape: str
    params: dict
    median_s: Optional[float] = None
    iqr_s: Optional[float] = None
    ratio: Optional[float] = None           # median / the case baseline's median (lower is faster)
    extra_peak_bytes: Optional[int] = None
    samples: int = 0
    skipped: Optional[str] = None           # the reason a candidate did not run here


def run_case(case: Case, profile: Profile, device: str, progress=None) -> list:
    timing = profile.heavy_timing if case.heavy else profile.timing
    runnable = case.runnable(device)
    rows = [Row(case.group, case.name, c.name, case.shape(), case.params, skipped=reason) for c, reason in runnable]
    inputs = case.setup()
    if case.check is not None:
        case.check(inputs)
    fns = {c.name: c.make(inputs) for c, reason in runnable if reason is None}
    step = 1 / (timing["rounds"] * max(1, len(fns)))  # one case is one unit of the progress bar
    peaks = {}
    if case.heavy:  # one call is seconds: the memory calls double as the timing's warm-up
        # A first round of memory calls, discarded, takes the one-time allocations and leaves the allocator as
        # every measured call finds it (a warm-up under glibc's default thresholds inflated plain CLIP by 11 MiB).
        for fn in fns.values():
            harness.extra_peak_bytes(fn, device)
        peaks = {name: harness.extra_peak_bytes(fn, device) for name, fn in fns.items()}
    samples = harness.time_candidates(fns, device, **timing,
                                      on_sample=(lambda: progress.update(step)) if progress is not None else None)
    if not case.heavy:  # after the warm-up, so that one-time allocations (thread pools) are not counted
        peaks = {name: harness.extra_peak_bytes(fn, device) for name, fn in fns.items()}
    medians = {name: harness.median_iqr(values) for name, values in samples.items()}
    base = medians.get(case.baseline, (None, None))[0]
    for row in rows:
        if row.skipped is not None:
            continue
        row.median_s, row.iqr_s = medians[row.candidate]
        row.samples = len(samples[row.candidate])
        row.ratio = row.median_s / base if base else None
        row.extra_peak_bytes = peaks[row.candidate]
    del fns, inputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows
