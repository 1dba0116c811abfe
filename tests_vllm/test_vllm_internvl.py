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
import tiny_families  # noqa: E402

NAME = "internvl"
CONTEXT, START, END = 152, 150, 151  # <IMG_CONTEXT>, <img>, </img>
from tiled_cases import DEFAULT, PER_TILE, TILES, engines, kept  # noqa: E402


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    vanilla, pruned, _ = engines(NAME, tmp_path_factory)
    return vanilla, pruned


def runs(result, token=CONTEXT):
    """Lengths of the runs of `token` in the prompt (one run per image)."""
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


def test_internvl_placeholders_per_tile_and_per_request(internvl):
    vanilla, pruned = internvl
    counts = [runs(r) for r in pruned[:6]] + [runs(pruned[7])]
    assert counts == [[3 * DEFAULT], [3 * PER_TILE], [3 * 3], [3 * DEFAULT, 5 * DEFAULT], [48, 80], [3 * DEFAULT],
                      [3 * kept(0.25)]]
    # Per tile: the kept indices the encoder chose, one list per tile, DEFAULT each.
    assert [len(k) for k in pruned[3]["kept"]] == [DEFAULT] * sum(TILES)
    # <img> and </img> stay around each image's (shorter) run.
    assert collapsed(pruned[3]["prompt_ids"]) == collapsed(vanilla[1]["prompt_ids"])
    assert runs(pruned[3], START) == runs(pruned[3], END) == [1, 1]
    assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    assert "hiprune_budget" in pruned[6]["error"] and "16" in pruned[6]["error"]


def test_internvl_full_budget_equals_vllm_without_plugin(internvl):
    vanilla, pruned = internvl
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["embeddings"] == theirs["embeddings"]


def test_internvl_kept_embeddings_are_the_towers_at_the_kept_indices(internvl):
    vanilla, pruned = internvl
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


def test_internvl_positions_are_recompacted(internvl):
    _, pruned = internvl
    for result in (pruned[0], pruned[3]):
        length = len(result["prompt_ids"])
        assert result["positions"][0][:length] == list(range(length))


def test_internvl_refuses_a_feature_layer_vllm_ignores(tmp_path):
    # vLLM feeds the last layer to the projector whatever vision_feature_layer says; apply_hiprune would score and
    # feed another, so a HiPrune setting on such a checkpoint fails engine start, naming the model and the reason.
    path = tiny_families.FAMILIES[NAME].build(str(tmp_path / NAME))
    output = scenario.run(path, NAME, {"hf_overrides": {"hiprune": {"ratio": 0.5}, "vision_feature_layer": -2},
                                       "requests": [{}]}, expect_failure=True)
    assert "InternVLForConditionalGeneration with vision_feature_layer=-2 is not supported" in output
