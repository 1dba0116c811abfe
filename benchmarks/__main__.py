"""`python -m benchmarks [--quick] [--device cpu|cuda] [--only NAME]`: the benchmark suite, with a progress bar.

Writes benchmarks/results/<device-slug>/<profile>.md, .csv, .json and two plots (see benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweeps and fewer samples (about 10 minutes "
                        "on a 2-core CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, each case once (what CI runs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", default=None, metavar="NAME",
                        help="run only the cases whose name contains NAME (e.g. select_maps, scoring, encoder/clip)")
    parser.add_argument("--output", default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke exclude each other")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


class _CaseLog:
    """Stands in for tqdm where it is not installed (a bare GPU image): one line per case."""

    def __init__(self, total: int):
        self.total, self.n = total, 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, text: str) -> None:
        print(f"[{int(self.n) + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, step: float) -> None:
        self.n += step


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _CaseLog(total)
    return tqdm(total=total, desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} cases [{elapsed}<{remaining}] {postfix}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import harness, report
    from .cases import PROFILES, all_cases, select_cases
    from .runner import run_case

    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    try:
        cases = select_cases(all_cases(profile.name, args.device), args.only)
    except ValueError as error:
        print(f"python -m benchmarks: {error}", file=sys.stderr)
        return 2
    if args.list:
        for case in cases:
            print(f"{case.name:55s} {case.shape()}")
        return 0
    folder = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         harness.device_slug(args.device))
    env = harness.environment(args.device)
    env["profile"] = profile.name + (f" (--only {args.only})" if args.only else "")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with _progress_bar(len(cases)) as progress:
        for case in cases:
            progress.set_postfix_str(case.name)
            done = progress.n
            rows += run_case(case, profile, args.device, progress)
            progress.update(done + 1 - progress.n)
    env["wall_time"] = f"{time.perf_counter() - start:.0f} s"
    env["load_average"] = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (1 min; other processes)"
    stem = profile.name if args.only is None else f"{profile.name}-only-{args.only.replace('/', '_')}"
    paths = report.write(folder, stem, env, rows)
    print(report.summary(rows, env))
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
