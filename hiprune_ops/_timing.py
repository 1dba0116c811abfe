"""The one timing rule for every number shown to a user (the demo, bench_vllm.py, the benchmark tables).

Every candidate is first warmed up (lazy set-up, allocator growth, thread pools: first-call costs land on nobody),
then timed in interleaved rounds in the order given (plain, ours, plain, ours, ...), so that drift from other work
on the machine hits all candidates alike. A ratio is taken per round, against the baseline of the same round, and
reported as the median over the rounds with its range (min to max); when that range is wider than WIDE_SPREAD of
the median, the rounds disagree too much for the median to be trusted, and the report says so.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Optional

from ._report import synchronize

# Range over median above which a ratio is flagged: the encoder goals are within a few percent of 1x, so rounds
# that disagree by more than 10% cannot tell a met goal from a missed one.
WIDE_SPREAD = 0.10

Timer = Callable[[Callable[[], object]], float]


def wall_timer(device: str = "cpu", clock: Callable[[], float] = time.perf_counter) -> Timer:
    """Seconds of one call by a host clock, queued GPU work waited for at both ends (`clock` is injectable)."""

    def time_call(fn: Callable[[], object]) -> float:
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        return clock() - start

    return time_call


def interleaved_times(candidates: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
                      calls_per_round: int = 1, timer: Optional[Timer] = None,
                      around: Optional[Callable[[str, Optional[int]], ContextManager]] = None,
                      on_round: Optional[Callable[[int, dict[str, list[float]]], None]] = None
                      ) -> dict[str, list[float]]:
    """Seconds per call of each candidate: `warmup` untimed calls of each, then `rounds` rounds that call every
    candidate in turn, `calls_per_round` timed calls each. `around(name, round)` (round None while warming up)
    wraps each call with untimed set-up and tear-down; `on_round(i, samples so far)` runs after round i."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0 or calls_per_round < 1:
        raise ValueError(f"warmup must be >= 0 and calls_per_round >= 1, got {warmup} and {calls_per_round}")
    timer = timer or wall_timer()
    around = around or (lambda name, round_: contextlib.nullcontext())
    for name, fn in candidates.items():
        for _ in range(warmup):
            with around(name, None):
                fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(rounds):
        for name, fn in candidates.items():
            for _ in range(calls_per_round):
                with around(name, round_):
                    samples[name].append(timer(fn))
        if on_round is not None:
            on_round(round_, samples)
    return samples


def per_round(samples: list[float], calls_per_round: int = 1) -> list[float]:
    """One value per round: the median of that round's calls."""
    return [statistics.median(samples[i:i + calls_per_round]) for i in range(0, len(samples), calls_per_round)]


@dataclass(frozen=True)
class Spread:
    """A median over rounds with its range."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @property
    def relative_range(self) -> float:
        return (self.high - self.low) / self.median if self.median else float("inf")

    @property
    def wide(self) -> bool:
        return self.relative_range > WIDE_SPREAD

    def note(self) -> Optional[str]:
        """Why the median should not be trusted as it is, or None."""
        if self.rounds < 2:
            return "1 round: no spread measured, rerun with more rounds before trusting the ratio"
        if self.wide:
            return (f"the rounds disagree by {100 * self.relative_range:.0f}% of the median (over "
                    f"{100 * WIDE_SPREAD:.0f}%): other work on this machine? rerun with more rounds before trusting "
                    "the ratio")
        return None

    def ratio_text(self) -> str:
        """e.g. '0.953x (median of 5 rounds, range 0.921x to 0.987x)'."""
        if self.rounds < 2:
            return f"{self.median:.3f}x (1 round)"
        return f"{self.median:.3f}x (median of {self.rounds} rounds, range {self.low:.3f}x to {self.high:.3f}x)"


def ratios(samples: Mapping[str, list[float]], baseline: str, calls_per_round: int = 1) -> dict[str, Spread]:
    """Each candidate's time over the baseline's, per round (same round, so same machine state), summarised over
    the rounds; the baseline itself is left out."""
    if baseline not in samples:
        raise KeyError(f"baseline {baseline!r} is not among the timed candidates {sorted(samples)}")
    base = per_round(samples[baseline], calls_per_round)
    out = {}
    for name, values in samples.items():
        if name == baseline:
            continue
        ours = per_round(values, calls_per_round)
        if len(ours) != len(base):
            raise ValueError(f"{name!r} has {len(ours)} rounds, the baseline {len(base)}")
        out[name] = Spread.of([o / b for o, b in zip(ours, base)])
    return out
