"""The suite's cases as pytest-benchmark tests: one test per case and candidate, plus one check per case that its
candidates agree (selection bit for bit with the reference and the published loop, scores with the dense map)."""

import gc

import pytest

from benchmarks import __main__ as cli
from benchmarks.cases import PROFILES, all_cases
from benchmarks.conftest import bench_device, bench_profile

_inputs = {}


def _case_inputs(case):
    """The inputs of one case at a time: building them can take seconds, holding several would take gigabytes."""
    if case.name not in _inputs:
        _inputs.clear()
        gc.collect()
        _inputs[case.name] = case.setup()
    return _inputs[case.name]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    cases = all_cases(bench_profile(config), bench_device(config))
    if "candidate" in metafunc.fixturenames:
        metafunc.parametrize("case,candidate", [(case, c) for case in cases for c in case.candidates],
                             ids=[f"{case.name}|{c.name}" for case in cases for c in case.candidates])
    elif "case" in metafunc.fixturenames:
        metafunc.parametrize("case", [case for case in cases if case.check], ids=[c.name for c in cases if c.check])


def test_candidate(benchmark, case, candidate, request):
    device = bench_device(request.config)
    reason = candidate.skip(case.params, device)
    if reason:
        pytest.skip(reason)
    fn = candidate.make(_case_inputs(case))
    benchmark.group = case.name
    benchmark.extra_info.update(case.params)
    profile = PROFILES[bench_profile(request.config)]
    timing = profile.heavy_timing if case.heavy else profile.timing
    benchmark.pedantic(fn, rounds=timing["repeat"] * timing["rounds"], warmup_rounds=timing["warmup"])


def test_candidates_agree(case):
    case.check(_case_inputs(case))


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--smoke", "--only", "no-such-case"]) == 2
    assert "--only 'no-such-case' matches no case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--device", "tpu"])
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_cli_writes_results(tmp_path):
    assert cli.main(["--smoke", "--only", "select_scores/qwen", "--output", str(tmp_path)]) == 0
    stem = "smoke-only-select_scores_qwen"
    for ext in ("md", "csv", "json"):
        text = (tmp_path / f"{stem}.{ext}").read_text()
        for key in ("torch", "triton", "threads", "git", "cpu"):
            assert key in text, (ext, key)
    csv_lines = [line for line in (tmp_path / f"{stem}.csv").read_text().splitlines() if not line.startswith("#")]
    assert csv_lines[0].startswith("group,case,candidate,shape,median_s,iqr_s,ratio_to_baseline,extra_peak_mib")
    assert any(",C++ op," in line or ",torch reference," in line for line in csv_lines[1:])


def test_selection_inputs_match_their_shapes(request):
    """Each case builds the inputs its shape column reports (cases are closures made in loops)."""
    for case in all_cases(bench_profile(request.config), bench_device(request.config)):
        if case.group.startswith("select") and (case.group == "select_scores" or case.params["B"] <= 2):
            x = case.setup()
            assert x.budget == case.params["budget"], case.name
            assert x.obj.shape[0] == case.params.get("rows", case.params["B"]), case.name
            assert f"{x.grid_h}x{x.grid_w}" == case.params["grid"], case.name


def _encoder_rows(plain_rounds, ours_rounds, recipe_rounds):
    """Encoder rows as the runner writes them (per-round medians), with round times chosen by the test."""
    from benchmarks.runner import Row
    from hiprune_ops import _timing

    params = dict(model="CLIP-L/14-336", B=1, layers=24)
    rows = []
    for name, rounds in (("plain SDPA, no pruning", plain_rounds), ("ours (SDPA + qk_scores + select)", ours_rounds),
                         ("published recipe (eager maps + loop)", recipe_rounds)):
        spread = _timing.Spread.of([r / p for r, p in zip(rounds, plain_rounds)])
        rows.append(Row("encoder", "encoder/clip/B1", name, "", params, median_s=sorted(rounds)[1], iqr_s=0.0,
                        ratio=spread.median, extra_peak_bytes=None, samples=3, round_s=list(rounds),
                        ratio_low=spread.low, ratio_high=spread.high))
    return rows


def test_tables_show_the_ratio_range_and_flag_a_wide_one():
    from benchmarks import publish, report

    env = {"device": "cpu"}
    # ours / plain per round: 0.95, 0.96, 0.97 (narrow); recipe / plain: 1.0, 1.5, 1.2 (wide).
    rows = _encoder_rows([2.0, 2.0, 2.0], [1.9, 1.92, 1.94], [2.0, 3.0, 2.4])
    table = report.markdown_table(rows, "encoder")
    assert "| ratio (range over rounds) |" in table
    assert "| 1x |" in table  # the baseline
    assert "| 0.96x (0.95 to 0.97) |" in table
    assert "| 1.2x (1 to 1.5, WIDE) |" in table
    measured = {goal.split(" (")[0]: text for goal, text, _ in report.goals(rows, env)}
    assert measured["ours <= 1.01x plain SDPA"] == "0.960x (range 0.950x to 0.970x over 3 rounds)"
    # recipe / ours per round: 2.0/1.9, 3.0/1.92, 2.4/1.94: the median of those, not a ratio of medians.
    assert measured["ours >= 1.2x faster than the published recipe"].startswith(
        f"{2.4 / 1.94:.3f}x (range {2.0 / 1.9:.3f}x to {3.0 / 1.92:.3f}x over 3 rounds; WIDE: the rounds disagree by")
    assert publish._range_caveat(rows) == []


def test_tables_from_an_older_results_file_say_they_have_no_range():
    from types import SimpleNamespace

    from benchmarks import publish, report

    rows = [SimpleNamespace(**{k: v for k, v in vars(row).items() if k not in ("round_s", "ratio_low", "ratio_high")})
            for row in _encoder_rows([2.0, 2.0, 2.0], [1.9, 1.92, 1.94], [2.0, 3.0, 2.4])]
    table = report.markdown_table(rows, "encoder")
    assert "| ratio |" in table and "| 0.96x |" in table and "range" not in table
    measured = {goal.split(" (")[0]: text for goal, text, _ in report.goals(rows, {"device": "cpu"})}
    assert measured["ours <= 1.01x plain SDPA"] == f"{1.92 / 2.0:.3f}x"  # medians' ratio, no range claimed
    assert "predates per-round ratios" in publish._range_caveat(rows)[0]


def test_compare_returns_medians_and_per_round_ratios():
    from benchmarks import harness

    calls = []
    medians, ratios = harness.compare({"base": lambda: calls.append("base"), "other": lambda: calls.append("other")},
                                      "base", rounds=3, warmup=1, repeat=2)
    assert calls == ["base", "other"] + (["base"] * 2 + ["other"] * 2) * 3  # warm-up, then interleaved rounds
    assert set(medians) == {"base", "other"} and set(ratios) == {"other"} and ratios["other"].rounds == 3
    assert ratios["other"].low <= ratios["other"].median <= ratios["other"].high
    with pytest.raises(KeyError, match="baseline 'missing' is not a candidate"):
        harness.compare({"base": lambda: None}, "missing")


def test_prompt_inputs_match_their_shapes(request):
    """Each prompt_select case builds the features, kept tokens and count its shape column reports."""
    for case in all_cases(bench_profile(request.config), bench_device(request.config)):
        if case.group == "prompt_select" and case.params["B"] <= 2:
            x = case.setup()
            params = case.params
            assert x.features.shape == (params["B"], params["N"], params["C"]), case.name
            assert x.indices.shape == (params["B"], params["budget"]) and x.extra == params["extra"], case.name
            assert hasattr(x, "obj_maps") == params["maps"], case.name
