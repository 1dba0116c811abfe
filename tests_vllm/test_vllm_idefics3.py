"""Tier 2 for Idefics3 (Idefics3ForConditionalGeneration) and SmolVLM (SmolVLMForConditionalGeneration, the same
binding) in real vLLM.

Tiny random models from tiny_families.py (112 px tiles; Idefics3: 8 x 8 patches, pixel_shuffle 2; SmolVLM: 16 x 16
patches, pixel_shuffle 4: 16 tokens per tile either way); requests, engines and expected counts shared with the
other tiled family (tiled_cases.py). Tensor parallelism is checked on Idefics3 only (one more process).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402

NAME = "idefics3"
CONTEXT, GLOBAL = 151, 153  # <image>, <global-img>
from tiled_cases import (DEFAULT, PER_TILE, TILES, check_full_budget_equals_vllm_without_plugin,  # noqa: E402
                         check_kept_embeddings_are_the_towers_at_the_kept_indices, check_positions_are_recompacted,
                         collapsed, engines, kept, shared_engines)

TWO_RANKS = "idefics3, two ranks"
SHARED_ENGINES = {**shared_engines(NAME, "smolvlm"),  # conftest.shared_runs
                  TWO_RANKS: scenario.multiprocess(NAME, {"requests": [{}]}, ranks=2, HIPRUNE_BUDGET=str(DEFAULT))}


@pytest.fixture(scope="module")
def idefics3(shared_runs, tiny_model):
    return engines(NAME, shared_runs, tiny_model)


@pytest.fixture(scope="module", params=[NAME, "smolvlm"])
def family(request, shared_runs, tiny_model):
    """(vanilla results, pruned results, model path) of Idefics3, then of SmolVLM."""
    return engines(request.param, shared_runs, tiny_model)


def runs(result, token=CONTEXT):
    """Lengths of the runs of `token` in the prompt."""
    return scenario.token_runs(result, token)


def test_idefics3_placeholders_per_tile_and_per_request(family):
    vanilla, pruned, _ = family
    counts = [sum(runs(r)) for r in pruned[:6]] + [sum(runs(pruned[7]))]
    assert counts == [3 * DEFAULT, 3 * PER_TILE, 3 * 3, 8 * DEFAULT, 48 + 80, 3 * DEFAULT, 3 * kept(0.25)]
    # Per tile: the kept indices the encoder chose, one list per tile, DEFAULT each.
    assert [len(k) for k in pruned[3]["kept"]] == [DEFAULT] * sum(TILES)
    # Every tile keeps its own (shorter) run after its markers: the prompt is vLLM's with each run shortened.
    assert runs(pruned[3]) == [DEFAULT] * sum(TILES)
    assert collapsed(pruned[3]["prompt_ids"], CONTEXT) == collapsed(vanilla[1]["prompt_ids"], CONTEXT)
    assert runs(pruned[3], GLOBAL) == [1, 1]
    assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    assert "hiprune_budget" in pruned[6]["error"] and "16" in pruned[6]["error"]


def test_idefics3_full_budget_equals_vllm_without_plugin(family):
    vanilla, pruned, _ = family
    check_full_budget_equals_vllm_without_plugin(vanilla, pruned)


def test_idefics3_kept_embeddings_are_the_towers_at_the_kept_indices(family):
    vanilla, pruned, _ = family
    check_kept_embeddings_are_the_towers_at_the_kept_indices(vanilla, pruned)


def test_idefics3_positions_are_recompacted(family):
    check_positions_are_recompacted(family[1])


def test_idefics3_tensor_parallel_ranks_select_the_same_tokens(idefics3, shared_runs, two_ranks):
    # Two ranks, the tower's heads split between them (vLLM's default mm_encoder_tp_mode "weights"): vLLM's
    # attention module keeps no tp_size, so the sharding is read from its heads (_vllm_api.tp_all_reduce); each
    # rank sums its heads, one all-reduce gives both the same scores, hence the same tokens as one rank alone.
    _, pruned, _ = idefics3
    results = shared_runs[TWO_RANKS]
    assert sum(runs(results[0])) == 3 * DEFAULT
    first, second = results[0]["kept_per_rank"]
    assert first == second == pruned[0]["kept"]
