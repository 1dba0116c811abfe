"""`python -m benchmarks.publish [RESULTS.json]`: copies measured numbers from a results file into the docs.

- README.md, section "## Benchmarks": the commands, the goals table and the main tables of the run, and one plot;
- docs/huggingface.md, section "## Measured": the end-to-end encoder and prefill tables.
Both name the device, the date and the git revision of the run. Without an argument it takes the newest
quick or full results file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from types import SimpleNamespace

from . import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

USAGE = """Every benchmark times its candidates side by side in one process and reports ratios to a baseline measured
in the same run: ours against the published recipe (restated in `hiprune_ops/published.py`), the torch reference
and its `torch.compile`, and against the floors (streaming the maps once, one SDPA forward, the unpruned model).

    make bench                                   # python -m benchmarks --quick (BENCH_ARGS= for the full sweeps)
    python -m benchmarks [--quick] [--device cpu|cuda] [--only NAME]   # --list shows the case names
    pytest benchmarks/ --benchmark-only          # the same cases under pytest-benchmark (--benchmark-compare)
    pytest benchmarks/ --benchmark-disable       # every case once at tiny shapes, candidates checked (CI)
    python -m benchmarks.publish                 # rewrites this section from the newest results file

Results go to `benchmarks/results/<device>/`: a markdown report, a CSV (shapes, median and IQR time, ratio to
the case baseline with its range over rounds, extra peak memory), a JSON and plots; each records the device,
CPU/GPU model, torch, triton, thread count and git revision. Candidates are warmed up, then timed in interleaved
rounds; a ratio is the median of the per-round ratios, shown with its range, and flagged WIDE when that range is
over 10% of the median."""


def newest_results() -> str:
    found = [p for p in glob.glob(os.path.join(RESULTS, "*", "*.json"))
             if os.path.basename(p) in ("quick.json", "full.json")]
    if not found:
        raise FileNotFoundError(f"no quick.json or full.json under {os.path.relpath(RESULTS, ROOT)}: run "
                                "`python -m benchmarks --quick` first")
    return max(found, key=lambda p: json.load(open(p))["environment"]["date"])


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    return data["environment"], [SimpleNamespace(**row) for row in data["rows"]]


def _machine(env: dict) -> str:
    if env["gpu"] != "none":
        return f"{env['gpu']} (CPU {env['cpu']})"
    return f"CPU {env['cpu']}, {env['threads']} threads"


def _provenance(env: dict, path: str, link_prefix: str = "") -> str:
    rel = os.path.relpath(path, ROOT)
    return (f"Measured on {_machine(env)}, {env['date']}, `{env['profile']}` profile, git {env['git']}, torch "
            f"{env['torch']}, triton {env['triton']}; copied by `python -m benchmarks.publish` from "
            f"[{rel}]({link_prefix}{rel}).")


def _range_caveat(rows) -> list:
    """Results files written before the suite kept each round's time have ratios without a range: say so."""
    if report.rounds_recorded(rows):
        return []
    return ["This run predates per-round ratios: its ratios are the median time over the baseline's median, without "
            "a range over rounds (rerun the suite for them).", ""]


def full_encoder_results(path: str) -> list:
    """The full-profile encoder runs beside a quick results file (`python -m benchmarks --only encoder/...`): the
    full-depth Qwen tower and CLIP-L at batch 8, too slow for the quick profile on a small CPU."""
    if os.path.basename(path) != "quick.json":
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(path), "full-only-encoder*.json")))


def full_encoder_parts(path: str, link_prefix: str = "") -> list:
    parts = []
    for extra in full_encoder_results(path):
        env, rows = load(extra)
        parts += ["Full profile: " + _provenance(env, extra, link_prefix), ""] + _range_caveat(rows)
        parts += [report.goals_markdown(rows, env), "", report.markdown_table(rows, "encoder", with_skipped=False),
                  ""]
    return parts


def readme_section(env: dict, rows, path: str) -> str:
    stem = os.path.splitext(path)[0]
    plot = f"{stem}-select-time-vs-batch.png"
    parts = ["## Benchmarks", "", USAGE, "", _provenance(env, path), ""] + _range_caveat(rows)
    parts += [report.goals_markdown(rows, env), ""]
    for group in ("select_maps", "encoder"):
        if any(r.group == group for r in rows):
            parts += [f"{report.GROUP_TITLES[group]}:", "", report.markdown_table(rows, group, with_skipped=False),
                      ""]
    parts += full_encoder_parts(path)
    if os.path.exists(plot):
        rel = os.path.relpath(plot, ROOT)
        parts += [f"![selection time against batch]({rel})", ""]
    return "\n".join(parts)


def hf_section(env: dict, rows, path: str) -> str:
    parts = ["## Measured", "", _provenance(env, path, link_prefix="../"), ""] + _range_caveat(rows)
    parts += ["Encoders with random weights: plain SDPA with no pruning; ours (every layer keeps SDPA, two layers "
              "scored from q and k, then `select_with_roles`); the published recipe (eager attention with every "
              "layer's map, then its per-image loop).", "",
              report.markdown_table(rows, "encoder", with_skipped=False), ""]
    parts += full_encoder_parts(path, link_prefix="../")
    parts += ["Prefill through `apply_hiprune` of a LLaVA-1.5-shaped model at reduced depth (random weights, encoder "
              "included, logits of the last position only):", "",
              report.markdown_table(rows, "prefill", with_skipped=False), "",
              report.prefill_markdown(rows), ""]
    return "\n".join(parts)


def replace_section(text: str, heading: str, new: str) -> str:
    """Replaces the section starting at the line `heading` up to the next '## ' heading (or appends it)."""
    lines = text.split("\n")
    try:
        start = lines.index(heading)
    except ValueError:
        return text.rstrip("\n") + "\n\n" + new.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "\n".join(lines[end:])
    return "\n".join(lines[:start]) + "\n" + new.rstrip("\n") + "\n" + ("\n" + tail if tail else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publish", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="a results .json (default: the newest quick/full run)")
    args = parser.parse_args(argv)
    try:
        path = os.path.abspath(args.results) if args.results else newest_results()
        env, rows = load(path)
    except (OSError, KeyError, ValueError) as error:
        print(f"python -m benchmarks.publish: cannot read the results: {error}", file=sys.stderr)
        return 2
    for doc, heading, section in (("README.md", "## Benchmarks", readme_section(env, rows, path)),
                                  (os.path.join("docs", "huggingface.md"), "## Measured",
                                   hf_section(env, rows, path))):
        full = os.path.join(ROOT, doc)
        with open(full) as f:
            text = f.read()
        with open(full, "w") as f:
            f.write(replace_section(text, heading, section))
        print(f"updated {doc} from {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
