"""Tier 2 for Idefics3 (Idefics3ForConditionalGeneration) in real vLLM.

Tiny random model from tiny_families.py (112 px tiles of 8 x 8 patches, pixel_shuffle 2: 16 tokens per tile);
requests, engines and expected counts shared with the other tiled family (tiled_cases.py).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402

NAME = "idefics3"
CONTEXT, GLOBAL = 151, 153  # <image>, <global-img>
from tiled_cases import DEFAULT, PER_TILE, TILES, engines, kept  # noqa: E402


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    return engines(NAME, tmp_path_factory)


def runs(result, token=CONTEXT):
    """Lengths of the runs of `token` in the prompt (one run per tile)."""
    lengths, previous = [], None
    for t in result["prompt_ids"]:
        if t == token:
            if previous != t:
                lengths.append(0)
            lengths[-1] += 1
        previous = t
    return lengths


def collapsed(prompt_ids):
    """The prompt with each run of placeholders as one token: what must not change when images are pruned."""
    return [t for i, t in enumerate(prompt_ids) if t != CONTEXT or i == 0 or prompt_ids[i - 1] != CONTEXT]


def test_idefics3_placeholders_per_tile_and_per_request(idefics3):
    vanilla, pruned, _ = idefics3
    counts = [sum(runs(r)) for r in pruned[:6]] + [sum(runs(pruned[7]))]
    assert counts == [3 * DEFAULT, 3 * PER_TILE, 3 * 3, 8 * DEFAULT, 48 + 80, 3 * DEFAULT, 3 * kept(0.25)]
    # Per tile: the kept indices the encoder chose, one list per tile, DEFAULT each.
    assert [len(k) for k in pruned[3]["kept"]] == [DEFAULT] * sum(TILES)
    # Every tile keeps its own (shorter) run after its markers: the prompt is vLLM's with each run shortened.
    assert runs(pruned[3]) == [DEFAULT] * sum(TILES)
    assert collapsed(pruned[3]["prompt_ids"]) == collapsed(vanilla[1]["prompt_ids"])
    assert runs(pruned[3], GLOBAL) == [1, 1]
    assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    assert "hiprune_budget" in pruned[6]["error"] and "16" in pruned[6]["error"]


def test_idefics3_full_budget_equals_vllm_without_plugin(idefics3):
    vanilla, pruned, _ = idefics3
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["embeddings"] == theirs["embeddings"]


def test_idefics3_kept_embeddings_are_the_towers_at_the_kept_indices(idefics3):
    vanilla, pruned, _ = idefics3
    for ours, full, tiles in ((pruned[0], vanilla[0], TILES[:1]), (pruned[2], vanilla[0], TILES[:1]),
                              (pruned[3], vanilla[1], TILES)):
        assert len(ours["embeddings"]) == len(full["embeddings"]) == len(tiles)
        per_tile = iter(ours["kept"])
        for embedding, whole, count in zip(ours["embeddings"], full["embeddings"], tiles):
            expected = []
            for tile in range(count):
                indices = next(per_tile)
                assert indices == sorted(indices) and len(set(indices)) == len(indices)
                expected += [whole[tile * PER_TILE + i] for i in indices]
            assert embedding == expected  # bit for bit: the same tower run, gathered tile after tile


def test_idefics3_positions_are_recompacted(idefics3):
    _, pruned, _ = idefics3
    for result in (pruned[0], pruned[3]):
        length = len(result["prompt_ids"])
        assert result["positions"][0][:length] == list(range(length))


def test_idefics3_tensor_parallel_ranks_select_the_same_tokens(idefics3):
    # Two ranks, the tower's heads split between them (vLLM's default mm_encoder_tp_mode "weights"): vLLM's
    # attention module keeps no tp_size, so the sharding is read from its heads (_vllm_api.tp_all_reduce); each
    # rank sums its heads, one all-reduce gives both the same scores, hence the same tokens as one rank alone.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU build needs a core per rank")
    _, pruned, path = idefics3
    results = scenario.run(path, NAME, {"requests": [{}], "engine": {"tensor_parallel_size": 2}}, in_process=False,
                           env={"HIPRUNE_BUDGET": str(DEFAULT), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                                # one core per rank: vLLM's automatic binding wants a NUMA node per rank
                                "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    assert sum(runs(results[0])) == 3 * DEFAULT
    first, second = results[0]["kept_per_rank"]
    assert first == second == pruned[0]["kept"]
