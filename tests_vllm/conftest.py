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


# Engines with the plugin are split over this many processes; the ones without it take one more. All run side by
# side, each on one thread: on the 2-core box a process spends much of its time in Python, single-threaded anyway.
PROCESSES_WITH_PLUGIN = 2


class SharedRuns:
    """The outcomes of the session's shared engines: `runs[name]` is the results of the engine declared as
    SHARED_ENGINES[name], or, for an engine declared to refuse to start, its error text. An engine that failed
    otherwise fails the tests that read it, not the others."""

    def __init__(self, engines: dict, outcomes: dict):
        self.engines, self.outcomes = engines, outcomes

    def __getitem__(self, name: str):
        engine, outcome = self.engines[name], self.outcomes[name]
        if engine.refuses:
            if "error" not in outcome:
                raise AssertionError(f"shared engine {name!r} started, expected a refusal")
            return outcome["error"]
        if "error" in outcome:
            raise AssertionError(f"shared engine {name!r} failed: {outcome['error']}")
        return outcome["results"]

    def pair(self, name: str) -> tuple:
        """(results without the plugin, results with it) of an engine pair (scenario.engine_pairs)."""
        return self[name + scenario.WITHOUT_PLUGIN], self[name]


def _balanced(names: list, engines: dict, groups: int) -> list:
    """names split into `groups` lists of about equal cost (an engine start costs about three requests)."""
    cost = {name: 3 + len(engines[name].spec["requests"]) for name in names}
    split, load = [[] for _ in range(groups)], [0] * groups
    for name in sorted(names, key=lambda n: -cost[n]):
        lightest = load.index(min(load))
        split[lightest].append(name)
        load[lightest] += cost[name]
    return [group for group in split if group]


@pytest.fixture(scope="session")
def shared_runs(request, tiny_model, tmp_path_factory) -> SharedRuns:
    """Every engine the session's test modules declare in a module-level SHARED_ENGINES = {name: scenario.Engine},
    run once per session, however many files read them: those without the plugin in one process, those with it in
    PROCESSES_WITH_PLUGIN more, all side by side (scenario.Many). Two files may declare the same name only for the
    same engine."""
    engines: dict = {}
    for module in {item.module for item in request.session.items if getattr(item, "module", None)}:
        for name, engine in getattr(module, "SHARED_ENGINES", {}).items():
            if engines.setdefault(name, engine) != engine:
                raise ValueError(f"two SHARED_ENGINES named {name!r} differ")
    model_dirs = {}
    for name, engine in engines.items():
        model_dirs[name] = tiny_model(engine.model)
        if engine.variant is not None:
            model_dirs[name] = engine.variant(model_dirs[name], str(tmp_path_factory.mktemp("variant") / engine.model))
    env = {"OMP_NUM_THREADS": "1"}
    groups = _balanced([n for n in engines if not engines[n].plugin], engines, 1)
    groups += _balanced([n for n in engines if engines[n].plugin], engines, PROCESSES_WITH_PLUGIN)
    running = [(group, scenario.Many([(model_dirs[n], engines[n].model, engines[n].spec) for n in group],
                                     plugin=engines[group[0]].plugin, env=env)) for group in groups]
    outcomes = {}
    for group, many in running:
        outcomes.update(zip(group, many.outcomes()))
    return SharedRuns(engines, outcomes)
