"""Tier 2 for the LLaVA-NeXT binding: a budget over the base tile and the AnyRes tiles, pruned images packed as
apply_hiprune packs them (base, then the tiles' kept tokens in raster order of the tiled grid, no newlines).

The tiny model (tiny_families.build_llava_next): CLIP at 112 px, 8 x 8 patches per tile, pinpoints 112 x 224,
224 x 112 and 224 x 224, so a 112 x 224 image is the base and 1 x 2 tiles, a 224 x 224 one the base and 2 x 2 tiles;
neither is unpadded. One engine without the plugin and one with it, every case reading the same runs.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept  # noqa: E402

GRID = 8
TOKEN = tiny_families.FAMILIES["llava_next"].image_token
RATIO = 0.25
# (height, width) -> tile rows, cols besides the base tile
LAYOUTS = {(112, 224): (1, 2), (224, 224): (2, 2)}
TWO = {"images": [[112, 224], [224, 224]], "image_seed": 10}


def full_count(rows, cols):
    return GRID * GRID + rows * GRID * (cols * GRID + 1)  # base, then the tiled grid with a newline per row


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 0}, "max_model_len": 1024}
SHARED_ENGINES = scenario.engine_pairs({"llava_next": ("llava_next",  # conftest.shared_runs
    {"engine": ENGINE, "requests": [{}, TWO]},
    {"engine": ENGINE, "hf_overrides": {"hiprune": {"ratio": RATIO}}, "requests": [
        *scenario.image_requests(TWO, 30),  # 0 to 5
        {"mm_processor_kwargs": {"hiprune_budget": 2}},        # 6 too few
    ]})})


@pytest.fixture(scope="module")
def runs(shared_runs):
    return shared_runs.pair("llava_next")


def test_placeholders_per_image_and_per_request(runs):
    _, pruned = runs
    per_tile = kept(RATIO, GRID * GRID)
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


def expected_rows(full, rows, cols, kept_per_tile):
    """vLLM's packed rows of an unpruned image (no unpadding) at the kept tokens, in apply_hiprune's order."""
    assert len(full) == full_count(rows, cols)
    out = [full[i] for i in kept_per_tile[0]]
    tiled = []  # (row, column) on the tiled grid of each kept tile token
    for tile, indices in enumerate(kept_per_tile[1:]):
        r, c = divmod(tile, cols)
        tiled += [(r * GRID + i // GRID, c * GRID + i % GRID) for i in indices]
    width = cols * GRID + 1  # the newline column
    return out + [full[GRID * GRID + y * width + x] for y, x in sorted(tiled)]


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
