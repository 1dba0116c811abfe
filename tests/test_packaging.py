"""Packaging: an extension built for another torch is refused with both versions named; the declared torch range,
the Makefile's compat torch and its quoted specs agree."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hiprune_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(hiprune_ops.__file__))
needs_extension = pytest.mark.skipif(not hiprune_ops.extension_loaded(), reason="extension not built")


def import_copy(python, tmp_path, built_for=None):
    """Imports a copy of this package (extension included) in a subprocess; built_for rewrites its record."""
    copy = tmp_path / "hiprune_ops"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if built_for is not None:
        (copy / "_C.torch_version").write_text(built_for + "\n")
    return subprocess.run([python, "-c", "import hiprune_ops"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


@needs_extension
def test_extension_for_another_torch_is_refused(tmp_path):
    result = import_copy(sys.executable, tmp_path, built_for="2.0.0")
    assert result.returncode != 0
    assert (f"hiprune_ops._C was built for torch 2.0.0, but torch {torch.__version__} is installed"
            in result.stderr), result.stderr


@needs_extension
@pytest.mark.skipif("HIPRUNE_OTHER_TORCH_PYTHON" not in os.environ,
                    reason="HIPRUNE_OTHER_TORCH_PYTHON (a python with another torch) not set: make test-compat sets it")
def test_real_other_torch_is_refused(tmp_path):
    # This extension, imported by a python whose torch is another release (make test-compat: the current torch
    # importing the package built for the oldest one).
    other = os.environ["HIPRUNE_OTHER_TORCH_PYTHON"]
    other_version = subprocess.run([other, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True, check=True).stdout.strip()
    assert other_version != torch.__version__
    result = import_copy(other, tmp_path)
    assert result.returncode != 0
    assert (f"hiprune_ops._C was built for torch {torch.__version__}, but torch {other_version} is installed"
            in result.stderr), result.stderr


def test_torch_range_starts_at_the_compat_torch():
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    lows = set(re.findall(r'"torch>=([\d.]+)"', pyproject))
    assert len(lows) == 1 and "torch==" not in pyproject, "one torch range, no pin, in pyproject.toml"
    compat = re.search(r"^COMPAT_TORCH := ([\d.]+)$", makefile, re.M).group(1)
    assert compat.startswith(lows.pop())


def test_makefile_quotes_every_version_spec():
    # An unquoted `setuptools>=64` is a shell redirection: pip gets `setuptools` and writes a file named `=64`.
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for deps in re.findall(r"^\w*DEPS := ((?:.*\\\n)*.*)$", makefile, re.M):
        for spec in deps.replace("\\\n", " ").split():
            assert not re.search(r"[<>=!~]", spec) or spec[0] == spec[-1] == "'", spec
