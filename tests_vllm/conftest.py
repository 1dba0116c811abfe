"""Fixtures every tier-2 file shares (the sharing pattern is described at the top of scenario.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_families  # noqa: E402
import tiny_models  # noqa: E402

# scenario.PROMPTS' architectures, whose builders are tiny_models'; every other name is a tiny_families family.
BUILDERS = {"llava": tiny_models.build_llava, "qwen": tiny_models.build_qwen}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> the folder of that tiny model, built on first use and shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def folder(name: str) -> str:
        if name not in built:
            build = BUILDERS[name] if name in BUILDERS else tiny_families.FAMILIES[name].build
            built[name] = build(str(root / name))
        return built[name]

    return folder


@pytest.fixture
def two_ranks():
    """The environment of a two-rank tensor-parallel engine (multiprocess mode, spied on): one core per rank, since
    vLLM's automatic binding wants a NUMA node per rank. Skips on a machine with one core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU build needs a core per rank")
    return {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
