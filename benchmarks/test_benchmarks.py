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


def test_prompt_inputs_match_their_shapes(request):
    """Each prompt_select case builds the features, kept tokens and count its shape column reports."""
    for case in all_cases(bench_profile(request.config), bench_device(request.config)):
        if case.group == "prompt_select" and case.params["B"] <= 2:
            x = case.setup()
            params = case.params
            assert x.features.shape == (params["B"], params["N"], params["C"]), case.name
            assert x.indices.shape == (params["B"], params["budget"]) and x.extra == params["extra"], case.name
            assert hasattr(x, "obj_maps") == params["maps"], case.name
