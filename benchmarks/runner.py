"""Runs cases: builds each case's inputs once, checks its candidates agree, times them side by side, measures the
extra peak memory of one call each, and returns one result row per case and candidate."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Optional

import torch

from hiprune_ops import _timing

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
    ratio: Optional[float] = None           # median over rounds of time / the baseline's time in that round
    extra_peak_bytes: Optional[int] = None
    samples: int = 0
    skipped: Optional[str] = None           # the reason a candidate did not run here
    round_s: list = field(default_factory=list)   # each round's median, in round order (for per-round ratios)
    ratio_low: Optional[float] = None       # the per-round ratio's range
    ratio_high: Optional[float] = None


def run_case(case: Case, profile: Profile, device: str, progress=None) -> list:
    timing = profile.heavy_timing if case.heavy else profile.timing
    runnable = case.runnable(device)
    rows = [Row(case.group, case.name, c.name, case.shape(), case.params, skipped=reason) for c, reason in runnable]
    inputs = case.setup()
    if case.check is not None:
        case.check(inputs)
    fns = {c.name: c.make(inputs) for c, reason in runnable if reason is None}
    step = 1 / timing["rounds"]  # one case is one unit of the progress bar
    peaks = {}
    if case.heavy:  # one call is seconds: the memory calls double as the timing's warm-up
        # A first round of memory calls, discarded, takes the one-time allocations and leaves the allocator as
        # every measured call finds it (a warm-up under glibc's default thresholds inflated plain CLIP by 11 MiB).
        for fn in fns.values():
            harness.extra_peak_bytes(fn, device)
        peaks = {name: harness.extra_peak_bytes(fn, device) for name, fn in fns.items()}
    samples = harness.time_candidates(fns, device, **timing,
                                      on_round=(lambda: progress.update(step)) if progress is not None else None)
    if not case.heavy:  # after the warm-up, so that one-time allocations (thread pools) are not counted
        peaks = {name: harness.extra_peak_bytes(fn, device) for name, fn in fns.items()}
    medians = {name: harness.median_iqr(values) for name, values in samples.items()}
    ratios = _timing.ratios(samples, case.baseline, timing["repeat"]) if case.baseline in samples else {}
    for row in rows:
        if row.skipped is not None:
            continue
        row.median_s, row.iqr_s = medians[row.candidate]
        row.samples = len(samples[row.candidate])
        row.round_s = _timing.per_round(samples[row.candidate], timing["repeat"])
        spread = _timing.Spread.of([1.0] * len(row.round_s)) if row.candidate == case.baseline else \
            ratios.get(row.candidate)
        if spread is not None:
            row.ratio, row.ratio_low, row.ratio_high = spread.median, spread.low, spread.high
        row.extra_peak_bytes = peaks[row.candidate]
    del fns, inputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows
