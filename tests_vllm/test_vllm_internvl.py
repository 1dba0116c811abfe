"""Tier 2 for InternVL 3 / 3.5 in transformers' format (InternVLForConditionalGeneration) in real vLLM.

Tiny random model from tiny_families.py (112 px tiles of 8 x 8 patches and CLS, pixel_shuffle 0.5: 16 tokens per
tile); requests, engines and expected counts shared with the other tiled family (tiled_cases.py).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402

NAME = "internvl"
CONTEXT, START, END = 152, 150, 151  # <IMG_CONTEXT>, <img>, </img>
from tiled_cases import (DEFAULT, PER_TILE, TILES, check_full_budget_equals_vllm_without_plugin,  # noqa: E402
                         check_kept_embeddings_are_the_towers_at_the_kept_indices, check_positions_are_recompacted,
                         collapsed, engines, kept, shared_engines)

# conftest.shared_runs; the last: vLLM feeds the last layer to the projector whatever vision_feature_layer says, and
# apply_hiprune would score and feed another, so a HiPrune setting on such a checkpoint must fail engine start.
FEATURE_LAYER = "internvl with vision_feature_layer -2"
SHARED_ENGINES = {**shared_engines(NAME), FEATURE_LAYER: scenario.Engine(
    NAME, {"hf_overrides": {"hiprune": {"ratio": 0.5}, "vision_feature_layer": -2}, "requests": [{}]}, refuses=True)}


@pytest.fixture(scope="module")
def internvl(shared_runs, tiny_model):
    vanilla, pruned, _ = engines(NAME, shared_runs, tiny_model)
    return vanilla, pruned


def runs(result, token=CONTEXT):
    """Lengths of the runs of `token` in the prompt."""
    return scenario.token_runs(result, token)


def test_internvl_placeholders_per_tile_and_per_request(internvl):
    vanilla, pruned = internvl
    counts = [runs(r) for r in pruned[:6]] + [runs(pruned[7])]
    assert counts == [[3 * DEFAULT], [3 * PER_TILE], [3 * 3], [3 * DEFAULT, 5 * DEFAULT], [48, 80], [3 * DEFAULT],
                      [3 * kept(0.25)]]
    # Per tile: the kept indices the encoder chose, one list per tile, DEFAULT each.
    assert [len(k) for k in pruned[3]["kept"]] == [DEFAULT] * sum(TILES)
    # <img> and </img> stay around each image's (shorter) run.
    assert collapsed(pruned[3]["prompt_ids"], CONTEXT) == collapsed(vanilla[1]["prompt_ids"], CONTEXT)
    assert runs(pruned[3], START) == runs(pruned[3], END) == [1, 1]
    assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    assert "hiprune_budget" in pruned[6]["error"] and "16" in pruned[6]["error"]


def test_internvl_full_budget_equals_vllm_without_plugin(internvl):
    vanilla, pruned = internvl
    check_full_budget_equals_vllm_without_plugin(vanilla, pruned)


def test_internvl_kept_embeddings_are_the_towers_at_the_kept_indices(internvl):
    vanilla, pruned = internvl
    check_kept_embeddings_are_the_towers_at_the_kept_indices(vanilla, pruned)


def test_internvl_positions_are_recompacted(internvl):
    check_positions_are_recompacted(internvl[1])


def test_internvl_refuses_a_feature_layer_vllm_ignores(shared_runs):
    output = shared_runs[FEATURE_LAYER]  # the engine did not start; its error names the model and the reason
    assert "InternVLForConditionalGeneration with vision_feature_layer=-2 is not supported" in output
