"""hiprune-ops benchmark suite: `python -m benchmarks`, `pytest benchmarks/`, `python -m benchmarks.publish`."""
