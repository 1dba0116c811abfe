"""Tier 2 for the SigLIP-grid bindings: Gemma 3 (4 x 4 average pool, pan-and-scan crops as tiles) and PaliGemma.

Tiny random models from tiny_families.py; per family one engine without the plugin and one with it, run in the
session's shared processes (conftest.shared_runs), every case reading the same runs.
Expected counts come from the tiles' grids and the budget rule, not from the engine.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept, token_runs  # noqa: E402

RATIO = 0.25
# A wide image that Gemma 3's pan-and-scan cuts into 4 crops of 300 x 300 px: 5 tiles with the original.
PAN_AND_SCAN = {"images": [[300, 1200]], "image_seed": 20, "mm_processor_kwargs": {"do_pan_and_scan": True}}
# Per family: tokens per tile (Gemma 3: 16 x 16 patches pooled 4 x 4; PaliGemma: 8 x 8 patches), the placeholder
# id, and the requests only it takes (Gemma 3: two images of different sizes, pan-and-scan crops).
FAMILIES = {
    "gemma3": (16, tiny_families.GEMMA3_SPECIAL["<image_soft_token>"], {"image": 2, "video": 0}, [
        {"images": [[224, 224], [112, 224]], "image_seed": 10},
        PAN_AND_SCAN,
    ]),
    "paligemma": (64, 150, {"image": 1, "video": 0}, []),
}


def with_kwargs(request, **kwargs):
    return dict(request, mm_processor_kwargs=dict(request.get("mm_processor_kwargs", {}), **kwargs))


def _pairs() -> dict:
    """name -> (model, vanilla spec, pruned spec): requests 0-3 shared, then the family's own, each pruned and at
    full budget."""
    pairs = {}
    for name, (_, _, limits, own) in FAMILIES.items():
        engine = {"limit_mm_per_prompt": limits}
        pairs[f"gemma {name}"] = (name, {"engine": engine, "requests": [{}] + own}, {
            "engine": engine, "hf_overrides": {"hiprune": {"ratio": RATIO}}, "requests": [
                {},                                                   # 0 the server default
                {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},      # 1 off for this request
                {"mm_processor_kwargs": {"hiprune_budget": 5}},       # 2 this request's budget
                {},                                                   # 3 the default again
            ] + [r for request in own for r in (request, with_kwargs(request, hiprune_budget=0))]})
    return pairs


TWO_RANKS = "gemma gemma3, two ranks"
SHARED_ENGINES = {**scenario.engine_pairs(_pairs()), TWO_RANKS: scenario.multiprocess(  # conftest.shared_runs
    "gemma3", {"requests": [{}], "hf_overrides": {"hiprune": {"ratio": RATIO}}}, ranks=2)}


@pytest.fixture(scope="module")
def engines(shared_runs):
    """name -> (vanilla runs, pruned runs)."""
    return {name: shared_runs.pair(f"gemma {name}") for name in FAMILIES}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, engines):
    """(name, vanilla runs, pruned runs) of one family."""
    return (request.param, *engines[request.param])


def test_placeholders_per_tile_and_per_request(family):
    name, _, pruned = family
    tokens, token = FAMILIES[name][:2]
    k = kept(RATIO, tokens)
    expected = [[k], [tokens], [5], [k]]
    if name == "gemma3":
        expected += [[k, k], [tokens, tokens], [k] * 5, [tokens] * 5]
    assert [token_runs(r, token) for r in pruned] == expected
    assert pruned[3]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    # Request 3 repeats request 0's image and budget: vLLM's encoder cache answers it, the encoder does not run.
    assert [[len(i) for i in r["kept"]] for r in pruned] == [runs if runs[0] < tokens and i != 3 else []
                                                             for i, runs in enumerate(expected)]


def test_full_budget_equals_vllm_without_plugin(family):
    name, vanilla, pruned = family
    pairs = [(pruned[1], vanilla[0])] + [(pruned[5 + 2 * i], vanilla[1 + i]) for i in range(len(vanilla) - 1)]
    for ours, theirs in pairs:
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"] == theirs["positions"]
        assert ours["embeddings"] == theirs["embeddings"]


def test_kept_embeddings_are_the_projectors_at_the_kept_indices(family):
    name, vanilla, pruned = family
    tokens = FAMILIES[name][0]
    pairs = [(pruned[0], vanilla[0]), (pruned[2], vanilla[0])]
    pairs += [(pruned[4 + 2 * i], vanilla[1 + i]) for i in range(len(vanilla) - 1)]
    for ours, full in pairs:
        # vanilla: one embedding per image, its tiles' tokens one after another; ours: the kept ones of each tile
        tiles = [image[start:start + tokens] for image in full["embeddings"] for start in range(0, len(image), tokens)]
        assert len(ours["kept"]) == len(tiles)
        kept_rows = [tile[i] for tile, indices in zip(tiles, ours["kept"]) for i in indices]
        assert all(indices == sorted(set(indices)) for indices in ours["kept"])
        assert [row for image in ours["embeddings"] for row in image] == kept_rows  # bit for bit: gathered


def test_kept_tokens_take_consecutive_positions(family):
    # 1-D positions, recompacted: the language model sees the shorter prompt as it is.
    _, _, pruned = family
    for result in pruned:
        length = len(result["prompt_ids"])
        assert result["positions"][0] == list(range(length))
        assert result["positions"][1] == [length]


def test_gemma3_tensor_parallel_ranks_select_the_same_tokens(engines, shared_runs, two_ranks):
    # Two ranks, SigLIP's heads split between them (Gemma 3 has no data-parallel encoder mode): each rank sums its
    # heads, one all-reduce gives both the same scores, hence the same tokens as one rank alone.
    _, pruned = engines["gemma3"]
    results = shared_runs[TWO_RANKS]
    first, second = results[0]["kept_per_rank"]
    assert first == second == pruned[0]["kept"]
    assert results[0]["prompt_ids"] == pruned[0]["prompt_ids"]
