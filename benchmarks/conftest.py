"""pytest benchmarks/: the suite's cases under pytest-benchmark.

    pytest benchmarks/ --benchmark-disable      # CI smoke test: every case once, tiny shapes, candidates checked
    pytest benchmarks/ --benchmark-only         # timings of the quick shapes (--bench-profile full for all)
    pytest benchmarks/ --benchmark-only --benchmark-autosave; then --benchmark-compare   # regression tracking
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("hiprune benchmarks")
    group.addoption("--bench-profile", choices=("smoke", "quick", "full"), default=None,
                    help="shapes of the cases (default: smoke with --benchmark-disable, else quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")


def bench_profile(config) -> str:
    chosen = config.getoption("bench_profile")
    if chosen:
        return chosen
    disabled = config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    return "smoke" if disabled else "quick"


def bench_device(config) -> str:
    return config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
