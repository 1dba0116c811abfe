"""What the tier-2 tests of the tiled families share (test_vllm_internvl.py, test_vllm_idefics3.py): their tiny
models of tiny_families.py have 112 px tiles of 16 tokens each (InternVL, Idefics3: 8 x 8 patches shuffled 2 x 2;
SmolVLM: 16 x 16 patches shuffled 4 x 4), plus one thumbnail (InternVL) or global image (Idefics3, SmolVLM) per
image; the same requests; one engine without the plugin and one with it per family, shared by all cases, run once per
session in its shared processes (conftest.shared_runs). Expected counts are computed from the tiles and the budget
rule.
"""

import scenario

PER_TILE = 16
# 112 x 224: two tiles and the thumbnail / global image; 224 x 224: four tiles and it.
SIZES = [[112, 224], [224, 224]]
TILES = [3, 5]
DEFAULT = round(PER_TILE / 3)  # the families' ratio 1/3: 5 of 16 per tile


def kept(ratio, n=PER_TILE):
    return scenario.kept(ratio, n)


TWO = {"images": SIZES, "image_seed": 10}  # other images than the one-image requests': no cache hit
REQUESTS = [
    {},                                                    # 0 the server default: the family's defaults
    {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},       # 1 off for this request
    {"mm_processor_kwargs": {"hiprune_budget": 3}},        # 2 another budget for this request
    dict(TWO),                                             # 3 two sizes in one prompt
    dict(TWO, mm_processor_kwargs={"hiprune_budget": 0}),  # 4 off
    {},                                                    # 5 the default again
    {"mm_processor_kwargs": {"hiprune_budget": 17}},       # 6 above a tile's 16: refused, the server goes on
    {"mm_processor_kwargs": {"hiprune_ratio": 0.25}},      # 7 a ratio for this request
]


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 0}}


def shared_engines(*names: str) -> dict:
    """The SHARED_ENGINES (conftest.shared_runs) of these families: one engine without the plugin, one with it."""
    return scenario.engine_pairs({f"tiled {name}": (name, {"engine": ENGINE, "requests": [{}, TWO]}, {
        "engine": ENGINE, "hf_overrides": {"hiprune": {}}, "requests": REQUESTS}) for name in names})


def engines(name: str, shared_runs, tiny_model):
    """(vanilla results, pruned results, model path) of the family `name` (conftest's fixtures)."""
    return (*shared_runs.pair(f"tiled {name}"), tiny_model(name))


def collapsed(prompt_ids, token):
    """The prompt with each run of `token` placeholders as one token: what must not change when images are pruned."""
    return [t for i, t in enumerate(prompt_ids) if t != token or i == 0 or prompt_ids[i - 1] != token]


def check_full_budget_equals_vllm_without_plugin(vanilla, pruned):
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["embeddings"] == theirs["embeddings"]


def check_kept_embeddings_are_the_towers_at_the_kept_indices(vanilla, pruned):
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


def check_positions_are_recompacted(pruned):
    for result in (pruned[0], pruned[3]):
        length = len(result["prompt_ids"])
        assert result["positions"][0][:length] == list(range(length))
