"""What the tier-2 tests of the tiled families share (test_vllm_internvl.py, test_vllm_idefics3.py): both tiny models
of tiny_families.py have 112 px tiles of 8 x 8 patches, shuffled 2 x 2 to 16 tokens per tile, plus one thumbnail
(InternVL) or global image (Idefics3) per image; the same requests; one engine without the plugin and one with it,
shared by all cases of a file (scenario.run). Expected counts are computed from the tiles and the budget rule.
"""

import scenario
import tiny_families

PER_TILE = 16
# 112 x 224: two tiles and the thumbnail / global image; 224 x 224: four tiles and it.
SIZES = [[112, 224], [224, 224]]
TILES = [3, 5]
DEFAULT = round(PER_TILE / 3)  # the families' ratio 1/3: 5 of 16 per tile


def kept(ratio, n=PER_TILE):
    return min(n, max(1, round(ratio * n)))


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


def engines(name: str, tmp_path_factory):
    """(vanilla results, pruned results, model path) of the family `name`'s tiny model."""
    path = tiny_families.FAMILIES[name].build(str(tmp_path_factory.mktemp(name) / name))
    engine = {"limit_mm_per_prompt": {"image": 2, "video": 0}}
    vanilla = scenario.run(path, name, {"engine": engine, "requests": [{}, TWO]}, plugin=False)
    pruned = scenario.run(path, name, {"engine": engine, "hf_overrides": {"hiprune": {}}, "requests": REQUESTS})
    return vanilla, pruned, path
