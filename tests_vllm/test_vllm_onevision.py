"""Tier 2 for the LLaVA-OneVision binding: LLaVA-NeXT's budget over the base tile and the AnyRes tiles under a SigLIP
tower without CLS; pruned images packed as apply_hiprune packs them (base, then the tiles' kept tokens in raster
order of the tiled grid, no newlines).

The tiny model (tiny_families.build_llava_onevision): SigLIP at 112 px, 8 x 8 patches per tile, the pinpoints of the
LLaVA-NeXT test, so the same layouts and packing (test_vllm_llava_next.py's helpers); neither image size is
unpadded nor downscaled. One engine without the plugin and one with it, every case reading the same runs.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from test_vllm_llava_next import GRID, LAYOUTS, TWO, expected_rows, full_count, kept  # noqa: E402

TOKEN = tiny_families.FAMILIES["llava_onevision"].image_token
RATIO = 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tiny_families.build_llava_onevision(str(tmp_path_factory.mktemp("families") / "llava_onevision"))
    engine = {"limit_mm_per_prompt": {"image": 2, "video": 0}, "max_model_len": 1024}
    vanilla = scenario.run(path, "llava_onevision", {"engine": engine, "requests": [{}, TWO]}, plugin=False)
    pruned = scenario.run(path, "llava_onevision", {"engine": engine, "hf_overrides": {"hiprune": {"ratio": RATIO}},
                                                    "requests": [
                                                        {},                                                  # 0
                                                        {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},     # 1 off
                                                        {"mm_processor_kwargs": {"hiprune_budget": 30}},     # 2
                                                        {},                                                  # 3
                                                        dict(TWO),                                           # 4
                                                        dict(TWO, mm_processor_kwargs={"hiprune_budget": 0}),  # 5
                                                        {"mm_processor_kwargs": {"hiprune_budget": 2}},      # 6
                                                    ]})
    return vanilla, pruned


def test_placeholders_per_image_and_per_request(runs):
    vanilla, pruned = runs
    per_tile = kept(RATIO, GRID * GRID)
    assert sum(t == TOKEN for t in vanilla[0]["prompt_ids"]) == full_count(1, 2)  # vLLM's own count
    expected = [[3 * per_tile], [full_count(1, 2)], [3 * (30 // 3)], [3 * per_tile], [3 * per_tile, 5 * per_tile],
                [full_count(1, 2), full_count(2, 2)]]
    for result, counts in zip(pruned, expected):
        assert sum(t == TOKEN for t in result["prompt_ids"]) == sum(counts)
    # Request 3 repeats request 0's image and budget: vLLM's encoder cache answers it, the encoder does not run.
    encoded = [counts if i != 3 else [] for i, counts in enumerate(expected)]
    assert [[len(e) for e in r["embeddings"]] for r in pruned[:6]] == encoded
    assert [[len(i) for i in r["kept"]] for r in pruned[:6]] == [[16] * 3, [], [10] * 3, [], [16] * 8, []]
    assert pruned[3]["tokens"] == pruned[0]["tokens"]  # the override did not stick


def test_a_budget_below_one_token_per_tile_is_refused_for_that_request(runs):
    _, pruned = runs
    assert "hiprune_budget=2 leaves no token per tile for an image with 3 tiles" in pruned[6]["error"]


def test_full_budget_equals_vllm_without_plugin(runs):
    vanilla, pruned = runs
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[5], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"] == theirs["positions"]
        assert ours["embeddings"] == theirs["embeddings"]


def test_kept_embeddings_are_the_projectors_at_the_kept_indices(runs):
    vanilla, pruned = runs
    sizes = [[112, 224]]
    for ours, full, image_sizes in ((pruned[0], vanilla[0], sizes), (pruned[2], vanilla[0], sizes),
                                    (pruned[4], vanilla[1], TWO["images"])):
        start = 0
        for embedding, whole, size in zip(ours["embeddings"], full["embeddings"], image_sizes):
            rows, cols = LAYOUTS[tuple(size)]
            tiles = ours["kept"][start:start + rows * cols + 1]
            start += rows * cols + 1
            assert all(indices == sorted(set(indices)) for indices in tiles)
            assert embedding == expected_rows(whole, rows, cols, tiles)  # bit for bit: gathered, not recomputed


def test_kept_tokens_take_consecutive_positions(runs):
    _, pruned = runs
    for result in pruned[:6]:
        length = len(result["prompt_ids"])
        assert result["positions"][0] == list(range(length))
        assert result["positions"][1] == [length]
