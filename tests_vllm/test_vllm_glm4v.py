"""Tier 2 for GLM-4.1V / GLM-4.5V (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration) in real vLLM.

Tiny random models from tiny_families.py; one engine without the plugin (GLM-4.1V) and one with it per family, shared
by all cases, in the session's shared processes (conftest.shared_runs). Expected counts and positions are computed
here from the images' sizes and the budget rule, not read from the engine.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept, mrope_positions, token_runs  # noqa: E402

UNIT = 28  # pixels per merged token: 14 px patches, 2x2 merge
# The family's own size and a smaller one of another shape (no resize): merged grids 6 x 4 and 3 x 5.
SIZES = [list(tiny_families.QWEN2_SIZE), [84, 140]]
GRIDS = [(h // UNIT, w // UNIT) for h, w in SIZES]
# Per class, the server setting and the ratio it means: GLM-4.5V (MoE) runs on the family's defaults (families.GLM4V).
SETTINGS = {"glm4v": ({"ratio": 0.25}, 0.25), "glm4v_moe": ({}, 0.334)}
REQUESTS = [
    {},                                                    # 0 the server default
    {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},       # 1 off for this request
    {"mm_processor_kwargs": {"hiprune_budget": 5}},        # 2 another budget for this request
    {"images": SIZES, "image_seed": 10},                   # 3 two sizes in one prompt (other images: no cache hit)
    {"images": SIZES, "image_seed": 10, "mm_processor_kwargs": {"hiprune_budget": 0}},  # 4 off
    {},                                                    # 5 the default again
    {"mm_processor_kwargs": {"hiprune_budget": -1}},       # 6 refused, the server goes on
]


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 0}}
# conftest.shared_runs: per class the plugin's engine, and GLM-4.1V's without it.
SHARED_ENGINES = {**{f"glm {name}": scenario.Engine(name, {"engine": ENGINE, "hf_overrides": {"hiprune": setting},
                                                           "requests": REQUESTS})
                     for name, (setting, _) in SETTINGS.items()},
                  "glm glm4v" + scenario.WITHOUT_PLUGIN: scenario.Engine(
                      "glm4v", {"engine": ENGINE, "requests": [REQUESTS[0], REQUESTS[3]]}, plugin=False)}


@pytest.fixture(scope="module")
def glm(shared_runs):
    """Per class: (the unpruned references of requests 0 and 3, the plugin's runs of REQUESTS, the default's ratio).
    GLM-4.1V's references come from vLLM without the plugin; GLM-4.5V's (only its language model differs) from the
    plugin's own requests 1 and 4, which keep every token: one engine fewer."""
    vanilla, glm4v = shared_runs.pair("glm glm4v")
    moe = shared_runs["glm glm4v_moe"]
    return {"glm4v": (vanilla, glm4v, SETTINGS["glm4v"][1]),
            "glm4v_moe": ([moe[1], moe[4]], moe, SETTINGS["glm4v_moe"][1])}


def image_runs(result):
    return token_runs(result, tiny_families.GLM_IMAGE)


def test_glm_placeholders_per_image_and_per_request(glm):
    n, m = (h * w for h, w in GRIDS)
    for name, (_, pruned, ratio) in glm.items():
        counts = [image_runs(r) for r in pruned[:6]]
        assert counts == [[kept(ratio, n)], [n], [5], [kept(ratio, n), kept(ratio, m)], [n, m], [kept(ratio, n)]], name
        assert [len(k) for k in pruned[3]["kept"]] == counts[3]
        assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
        assert "hiprune_budget" in pruned[6]["error"]


def test_glm_full_budget_equals_vllm_without_plugin(glm):
    vanilla, pruned, _ = glm["glm4v"]
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"][0] == theirs["positions"][0]
        assert ours["embeddings"] == theirs["embeddings"]


def test_glm_kept_embeddings_are_the_towers_at_the_kept_indices(glm):
    for name, (full, pruned, _) in glm.items():
        for ours, whole_run in ((pruned[0], full[0]), (pruned[2], full[0]), (pruned[3], full[1])):
            assert len(ours["embeddings"]) == len(whole_run["embeddings"]) == len(ours["kept"]), name
            for embedding, whole, indices in zip(ours["embeddings"], whole_run["embeddings"], ours["kept"]):
                assert indices == sorted(indices) and len(set(indices)) == len(indices)
                assert embedding == [whole[i] for i in indices]  # bit for bit: the same tower run, gathered


def expected_positions(prompt_ids, kept_per_image):
    return mrope_positions(prompt_ids, tiny_families.GLM_IMAGE, GRIDS, kept_per_image)


def test_glm_kept_tokens_keep_their_positions(glm):
    # The rule of expected_positions is vLLM's own on an unpruned prompt of two images.
    full = glm["glm4v"][0][1]
    everything = [list(range(h * w)) for h, w in GRIDS]
    assert [row[:len(full["prompt_ids"])] for row in full["positions"][0]] == expected_positions(full["prompt_ids"],
                                                                                                everything)
    for name, (_, pruned, _) in glm.items():
        for result in (pruned[0], pruned[2], pruned[3]):
            length = len(result["prompt_ids"])
            prefill = result["positions"][0]
            assert [row[:length] for row in prefill] == expected_positions(result["prompt_ids"], result["kept"]), name
            first_decode = result["positions"][1]
            assert [row[0] for row in first_decode] == [prefill[0][length - 1] + 1] * 3


def test_glm_media_items_are_vllms_on_an_unpruned_prompt():
    # hiprune_media reads the items as vLLM's iter_mm_grid_thw does, without its full-count assertion: on a prompt
    # that keeps every token (an image, then a video of 2 slices, each slice its own run between markers and
    # timestamp text) both give the same (offset, t, h, w), video slices one by one.
    from types import SimpleNamespace

    import torch
    from hiprune_ops.integrations.vllm.glm4v import Glm4vStyleMixin
    from vllm.model_executor.models.glm4_1v import Glm4vForConditionalGeneration
    from vllm.multimodal.inputs import PlaceholderRange

    def feature(modality, grid, offset, is_embed=None):
        length = len(is_embed) if is_embed is not None else grid[0] * grid[1] * grid[2] // 4
        mask = None if is_embed is None else torch.tensor(is_embed)
        data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
        return SimpleNamespace(modality=modality, data=data,
                               mm_position=PlaceholderRange(offset=offset, length=length, is_embed=mask))

    slice_run = [False] + [True] * 6 + [False, False, False]  # <|begin_of_image|>, 2 x 3 tokens, end, timestamp
    features = [feature("video", [2, 4, 6], 40, slice_run * 2), feature("image", [1, 12, 8], 3)]
    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    ours = [item[:4] for item in Glm4vStyleMixin.hiprune_media(model, list(range(80)), features)]
    assert ours == list(Glm4vForConditionalGeneration.iter_mm_grid_thw(model, features))
    assert ours == [(3, 1, 6, 4), (41, 1, 2, 3), (51, 1, 2, 3)]
