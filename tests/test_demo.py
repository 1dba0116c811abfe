"""`hiprune demo` end to end (tiny encoder with the ViT-L/14-336 grid; `make demo` runs the full-size one)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("skimage")
Image = pytest.importorskip("PIL.Image")

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
