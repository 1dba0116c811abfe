"""Tier 2 for the LLaVA-OneVision binding: LLaVA-NeXT's budget over the base tile and the AnyRes tiles under a SigLIP
tower without CLS; pruned images packed as apply_hiprune packs them (base, then the tiles' kept tokens in raster
order of the tiled grid, no newlines).

The tiny model (tiny_families.build_llava_onevision): SigLIP at 112 px, 8 x 8 patches per tile, the pinpoints and
placeholder id of the LLaVA-NeXT test's model, so the same layouts, counts and packing: this module runs
test_vllm_llava_next.py's cases (imported below) on the same requests to OneVision's engines (its `runs`). Neither
image size is unpadded nor downscaled. One engine without the plugin and one with it.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
import test_vllm_llava_next as llava_next  # noqa: E402
from test_vllm_llava_next import (  # noqa: E402,F401  (the cases, collected here with this module's `runs`)
    test_a_budget_below_one_token_per_tile_is_refused_for_that_request, test_full_budget_equals_vllm_without_plugin,
    test_kept_embeddings_are_the_projectors_at_the_kept_indices, test_kept_tokens_take_consecutive_positions,
    test_placeholders_per_image_and_per_request)

TWO, RATIO = llava_next.TWO, llava_next.RATIO


def test_the_cases_apply_to_this_model():
    assert tiny_families.FAMILIES["llava_onevision"].image_token == llava_next.TOKEN
    assert tiny_families.FAMILIES["llava_onevision"].image_size == tiny_families.FAMILIES["llava_next"].image_size


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
    assert sum(t == llava_next.TOKEN for t in vanilla[0]["prompt_ids"]) == llava_next.full_count(1, 2)  # vLLM's
    return vanilla, pruned
