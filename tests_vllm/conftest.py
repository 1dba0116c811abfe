"""Fixtures every tier-2 file shares (the sharing pattern is described at the top of scenario.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenario  # noqa: E402
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


@pytest.fixture(scope="session")
def shared_runs(request, tiny_model):
    """name -> (vanilla runs, pruned runs) of every engine the session's test modules declare in a module-level
    SHARED_ENGINES = {tiny model name: (spec without the plugin, spec with it)}: every engine without the plugin
    runs in one process, every one with it in another, once per session, however many files read them."""
    declared: dict = {}
    for module in {item.module for item in request.session.items if getattr(item, "module", None)}:
        declared.update(getattr(module, "SHARED_ENGINES", {}))
    names = sorted(declared)
    vanilla = scenario.run_many([(tiny_model(n), n, declared[n][0]) for n in names], plugin=False)
    pruned = scenario.run_many([(tiny_model(n), n, declared[n][1]) for n in names])
    return dict(zip(names, zip(vanilla, pruned)))
