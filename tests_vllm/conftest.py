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
    """Skips a test of a two-rank engine (scenario.multiprocess) on a machine with one core."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU build needs a core per rank")


# In-process engines with the plugin are split over this many processes; those without it take one more, the
# multiprocess-mode engines another. All start with the session's first test and run side by side, the in-process
# ones on one thread each: on the 2-core box a process spends much of its time in Python, single-threaded anyway.
IN_PROCESS_WITH_PLUGIN = 2


class SharedRuns:
    """The outcomes of the session's shared engines: `runs[name]` is the results of the engine declared as
    SHARED_ENGINES[name], or, for an engine declared to refuse to start, its error text; it waits for the process
    running that engine only. An engine that failed otherwise fails the tests that read it, not the others."""

    def __init__(self, engines: dict, model_dirs: dict, running: list):
        self.engines, self.model_dirs, self.running, self.outcomes = engines, model_dirs, running, {}

    def __getitem__(self, name: str):
        engine = self.engines[name]
        if name not in self.outcomes:
            group, many = next((group, many) for group, many in self.running if name in group)
            self.outcomes.update(zip(group, many.outcomes()))
        outcome = self.outcomes[name]
        if engine.refuses:
            if "error" not in outcome:
                raise AssertionError(f"shared engine {name!r} started, expected a refusal")
            return outcome["error"]
        if "error" in outcome:
            raise AssertionError(f"shared engine {name!r} failed: {outcome['error']}")
        return outcome["results"]

    def model_dir(self, name: str) -> str:
        """The folder of the model the engine ran (its variant's, if it has one)."""
        return self.model_dirs[name]

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


@pytest.fixture(scope="session", autouse=True)
def shared_runs(request, tiny_model, tmp_path_factory):
    """Every engine the session's test modules declare in a module-level SHARED_ENGINES = {name: scenario.Engine},
    run once per session, however many files read them (scenario.Many). Two files may declare the same name only
    for the same engine."""
    engines: dict = {}
    for module in {item.module for item in request.session.items if getattr(item, "module", None)}:
        for name, engine in getattr(module, "SHARED_ENGINES", {}).items():
            if engines.setdefault(name, engine) != engine:
                raise ValueError(f"two SHARED_ENGINES named {name!r} differ")
    model_dirs, variants = {}, {}  # variants: (model, variant) -> its copy, made once for every engine running it
    for name, engine in engines.items():
        model_dirs[name] = tiny_model(engine.model)
        if engine.variant is not None:
            key = (engine.model, engine.variant)
            if key not in variants:
                variants[key] = engine.variant(model_dirs[name],
                                               str(tmp_path_factory.mktemp("variant") / engine.model))
            model_dirs[name] = variants[key]

    def of_kind(plugin, in_process):
        return [n for n, e in engines.items() if e.plugin == plugin and e.in_process == in_process]

    running = []
    for plugin, in_process, processes, env in [
            (True, False, 1, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}),  # vLLM may pickle the spy for its workers
            (True, True, IN_PROCESS_WITH_PLUGIN, {"OMP_NUM_THREADS": "1"}),
            (False, True, 1, {"OMP_NUM_THREADS": "1"})]:
        for group in _balanced(of_kind(plugin, in_process), engines, processes):
            jobs = [(model_dirs[n], engines[n].model, engines[n].spec) for n in group]
            running.append((group, scenario.Many(jobs, plugin=plugin, env=env, in_process=in_process)))
    unplaced = set(engines) - {name for group, _ in running for name in group}
    if unplaced:
        raise ValueError(f"SHARED_ENGINES of no kind run here: {sorted(unplaced)}")
    yield SharedRuns(engines, model_dirs, running)
    for _, many in running:  # a session cut short (-x, a deselected reader) leaves none running
        many.stop()
