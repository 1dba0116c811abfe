"""`hiprune demo` end to end (tiny encoder with the ViT-L/14-336 grid; `make demo` runs the full-size one)."""

import contextlib
import os
import re
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("skimage")
Image = pytest.importorskip("PIL.Image")

from hiprune_ops import _timing as timing  # noqa: E402
from hiprune_ops import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_png(path, size=336):
    assert os.path.isfile(path)
    with Image.open(path) as image:
        image.verify()  # raises on a corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (size, size)
        # Not a blank canvas: the overlay and the photo vary.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 100


def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "overlay.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "hiprune_ops.cli", "demo", "--size", "tiny", "--output", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert f"overlay written to {out}" in text
    for needle in ("anchor", "buffer", "register", "unpatched SDPA encoder pass", "encoder + selection / unpatched",
                   "LLaVA-1.5-7B language-model prefill FLOPs", "[1/5]", "layer 4/4"):
        assert needle in text, needle
    # The role counts add up to the budget (192 of the 24x24 grid by default).
    assert "total     192" in text
    for budget in ("192", "128", "64"):
        assert any(line.startswith(budget + " ") for line in text.splitlines())
    _check_png(str(out))


def test_demo_flags(tmp_path, capsys):
    out = tmp_path / "official.png"
    code = cli.main(["demo", "--size", "tiny", "--budget", "100", "--alpha", "0.3", "--official", "--device",
                     "cpu", "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "budget 100 of 576, alpha 0.3" in text and "official=True" in text
    # n_anchor = round_half_even(100 * 0.3 / 5) = 6 anchors.
    assert "anchor    6" in text
    _check_png(str(out))


def test_demo_bad_budget_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["demo", "--size", "tiny", "--budget", "0", "--output", str(tmp_path / "x.png")])
    assert code == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_prefill_flops_formula():
    # One layer, 2 tokens, d=2, f=3: 8*2*4 + 4*4*2 + 6*2*2*3 = 64 + 32 + 72.
    assert cli.prefill_flops(2, layers=1, hidden=2, intermediate=3) == 168


RATIO_LINE = re.compile(r"^encoder \+ selection / unpatched SDPA pass: (\d+\.\d{3})x \(median of (\d+) rounds, "
                        r"range (\d+\.\d{3})x to (\d+\.\d{3})x\)$", re.MULTILINE)
ROUND_LINE = re.compile(r"^      round (\d+)/(\d+): unpatched [\d.]+ ms, encoder \+ selection [\d.]+ ms "
                        r"\((\d+\.\d{3})x\)$", re.MULTILINE)


def test_demo_timing_reports_rounds_and_spread(tmp_path, capsys):
    # Twice in a row, as a new user would: each run reports its rounds, the median ratio with its range, and the
    # note exactly when that range is too wide. The numbers themselves are not checked (timing is not tested).
    for run in range(2):
        code = cli.main(["demo", "--size", "tiny", "--output", str(tmp_path / f"run{run}.png")])
        assert code == 0
        text = capsys.readouterr().out
        assert f"1 warm-up pass of each, then {cli.DEMO_ROUNDS} interleaved rounds" in text
        assert f"median and range of {cli.DEMO_ROUNDS} interleaved rounds" in text and "range ms" in text
        rounds = ROUND_LINE.findall(text)
        assert [(int(i), int(n)) for i, n, _ in rounds] == [(i, cli.DEMO_ROUNDS) for i in
                                                             range(1, cli.DEMO_ROUNDS + 1)]
        found = RATIO_LINE.findall(text)
        assert len(found) == 1, text
        median, count, low, high = found[0]
        assert int(count) == cli.DEMO_ROUNDS
        # The summary is of the rounds printed above it.
        per_round = sorted(r for _, _, r in rounds)
        assert (low, high) == (per_round[0], per_round[-1])
        assert float(median) == pytest.approx(statistics.median(map(float, per_round)), abs=1e-3)  # printed rounded
        relative = (float(high) - float(low)) / float(median)
        if abs(relative - timing.WIDE_SPREAD) > 0.01:  # printed to 3 decimals: too close to call at the edge
            assert ("note: the rounds disagree" in text) == (relative > timing.WIDE_SPREAD), text


def test_demo_one_round_says_it_has_no_spread(tmp_path, capsys):
    assert cli.main(["demo", "--size", "tiny", "--rounds", "1", "--output", str(tmp_path / "one.png")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^encoder \+ selection / unpatched SDPA pass: \d+\.\d{3}x \(1 round\)$", text, re.MULTILINE)
    assert "note: 1 round: no spread measured" in text


def test_demo_bad_rounds_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--size", "tiny", "--rounds", "0", "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


class FakeClock:
    """A clock that only moves when a timed call says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(clock, calls, name, durations):
    """A candidate whose successive calls take the given durations on the fake clock, logged in `calls`."""
    remaining = list(durations)

    def fn():
        calls.append(name)
        clock.now += remaining.pop(0)

    return fn


def test_timing_warms_up_then_interleaves_in_the_given_order():
    clock, calls, contexts = FakeClock(), [], []

    @contextlib.contextmanager
    def around(name, round_):
        contexts.append((name, round_))
        clock.now += 100.0  # untimed set-up: must not reach the samples
        yield

    candidates = {"plain": scripted(clock, calls, "plain", [50.0, 1.0, 2.0, 3.0]),
                  "ours": scripted(clock, calls, "ours", [70.0, 1.5, 2.5, 3.5])}
    seen_rounds = []
    samples = timing.interleaved_times(candidates, rounds=3, warmup=1, timer=timing.wall_timer("cpu", clock),
                                       around=around, on_round=lambda i, so_far: seen_rounds.append(
                                           (i, {k: list(v) for k, v in so_far.items()})))
    assert calls == ["plain", "ours"] + ["plain", "ours"] * 3
    assert contexts == [("plain", None), ("ours", None)] + [(n, r) for r in range(3) for n in ("plain", "ours")]
    # The warm-up calls (50, 70) and the set-up time are not samples.
    assert samples == {"plain": [1.0, 2.0, 3.0], "ours": [1.5, 2.5, 3.5]}
    assert seen_rounds[0] == (0, {"plain": [1.0], "ours": [1.5]}) and [i for i, _ in seen_rounds] == [0, 1, 2]


def test_timing_calls_per_round_are_grouped_and_summarised_per_round():
    clock, calls = FakeClock(), []
    # Binary fractions: the fake clock's sums and differences are exact.
    candidates = {"plain": scripted(clock, calls, "plain", [1.0, 8.0, 1.25, 2.0, 2.0, 2.0]),
                  "ours": scripted(clock, calls, "ours", [1.0, 1.125, 1.125, 2.25, 0.125, 2.25])}
    samples = timing.interleaved_times(candidates, rounds=2, warmup=0, calls_per_round=3,
                                       timer=timing.wall_timer("cpu", clock))
    assert calls == ["plain"] * 3 + ["ours"] * 3 + ["plain"] * 3 + ["ours"] * 3
    assert timing.per_round(samples["plain"], 3) == [1.25, 2.0]
    assert timing.per_round(samples["ours"], 3) == [1.125, 2.25]
    spread = timing.ratios(samples, "plain", calls_per_round=3)["ours"]
    assert (spread.low, spread.median, spread.high, spread.rounds) == (0.9, pytest.approx(1.0125), 1.125, 2)


def test_ratio_is_the_median_of_per_round_ratios_with_its_range_and_a_wide_note():
    # Round-by-round: 1.1, 0.9, 0.9. The ratio of the medians (1.1 / 1.0) would hide the other two rounds.
    samples = {"plain": [1.0, 2.0, 1.0], "ours": [1.1, 1.8, 0.9]}
    spread = timing.ratios(samples, "plain")["ours"]
    assert (spread.median, spread.low, spread.high, spread.rounds) == (
        pytest.approx(0.9), pytest.approx(0.9), pytest.approx(1.1), 3)
    assert spread.relative_range == pytest.approx(0.2 / 0.9) and spread.wide
    assert spread.note() == ("the rounds disagree by 22% of the median (over 10%): other work on this machine? "
                             "rerun with more rounds before trusting the ratio")
    assert spread.ratio_text() == "0.900x (median of 3 rounds, range 0.900x to 1.100x)"


def test_ratio_within_the_tolerance_has_no_note():
    samples = {"plain": [2.0, 2.0, 2.0, 2.0], "ours": [1.9, 2.0, 2.08, 1.95]}
    spread = timing.ratios(samples, "plain")["ours"]
    assert spread.median == pytest.approx(0.9875) and (spread.low, spread.high) == (0.95, 1.04)
    assert spread.relative_range == pytest.approx(0.09 / 0.9875)
    assert not spread.wide and spread.note() is None
    one = timing.Spread.of([0.97])
    assert one.ratio_text() == "0.970x (1 round)" and one.note().startswith("1 round: no spread measured")


def test_timing_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        timing.interleaved_times({"a": lambda: None}, rounds=0)
    with pytest.raises(KeyError, match="baseline 'plain' is not among the timed candidates"):
        timing.ratios({"ours": [1.0]}, "plain")
    with pytest.raises(ValueError, match="'ours' has 1 rounds, the baseline 2"):
        timing.ratios({"plain": [1.0, 1.0], "ours": [1.0]}, "plain")
    with pytest.raises(ValueError, match="no values"):
        timing.Spread.of([])
