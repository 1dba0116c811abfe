"""Tier 2 for the LLaVA-OneVision binding: LLaVA-NeXT's budget over the base tile and the AnyRes tiles under a SigLIP
tower without CLS; pruned images packed as apply_hiprune packs them (base, then the tiles' kept tokens in raster
order of the tiled grid, no newlines).

The tiny model (tiny_families.build_llava_onevision): SigLIP at 112 px, 8 x 8 patches per tile, the pinpoints and
placeholder id of the LLaVA-NeXT test's model, so the same layouts, counts and packing: this module runs
test_vllm_llava_next.py's cases (imported below) on the same requests to OneVision's engines (its `runs`). Neither
image size is unpadded nor downscaled. One engine without the plugin and one with it. Videos on the same engines:
4 frames of 8 x 8 patches pooled to 4 x 4, one run of placeholders per video with the newline last, pruned per frame.
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
VIDEO_TOKEN = tiny_families.FAMILIES["llava_onevision"].video_token
VIDEO_RATIO = 0.5
FRAMES, FRAME_TOKENS = 4, 4 * 4
VIDEO = {"videos": [[FRAMES, 112, 112]]}
BOTH = dict(VIDEO, images=[[112, 224]], image_seed=20)  # an image, then a video, in one prompt
BUILT: dict = {}  # the tiny checkpoint's path, for the transformers comparison


def test_the_cases_apply_to_this_model():
    assert tiny_families.FAMILIES["llava_onevision"].image_token == llava_next.TOKEN
    assert tiny_families.FAMILIES["llava_onevision"].image_size == tiny_families.FAMILIES["llava_next"].image_size


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 1}, "max_model_len": 1024}
SHARED_ENGINES = scenario.engine_pairs({"llava_onevision": ("llava_onevision",  # conftest.shared_runs
    {"engine": ENGINE, "requests": [{}, TWO, VIDEO, BOTH]},
    {"engine": ENGINE, "hf_overrides": {"hiprune": {"ratio": RATIO, "video_ratio": VIDEO_RATIO}}, "requests": [
        *scenario.image_requests(TWO, 30),  # 0 to 5
        {"mm_processor_kwargs": {"hiprune_budget": 2}},                  # 6
        dict(VIDEO),                                                     # 7
        dict(VIDEO, mm_processor_kwargs={"hiprune_video_budget": 3}),    # 8
        dict(VIDEO, mm_processor_kwargs={"hiprune_video_ratio": 1.0}),   # 9
        dict(BOTH),                                                      # 10
    ]})})


@pytest.fixture(scope="module")
def runs(shared_runs, tiny_model):
    vanilla, pruned = shared_runs.pair("llava_onevision")
    BUILT["path"] = tiny_model("llava_onevision")
    assert sum(t == llava_next.TOKEN for t in vanilla[0]["prompt_ids"]) == llava_next.full_count(1, 2)  # vLLM's
    return vanilla, pruned


# -- videos --------------------------------------------------------------------------------------------------------
def test_video_frames_keep_their_count_each_and_the_newline_stays(runs):
    vanilla, pruned = runs
    assert scenario.token_runs(vanilla[2], VIDEO_TOKEN) == [FRAMES * FRAME_TOKENS + 1]  # vLLM's
    expected = {7: kept(VIDEO_RATIO), 8: 3, 9: FRAME_TOKENS, 10: kept(VIDEO_RATIO)}
    for i, per_frame in expected.items():
        assert scenario.token_runs(pruned[i], VIDEO_TOKEN) == [FRAMES * per_frame + 1], i
    assert [len(k) for k in pruned[7]["kept"]] == [kept(VIDEO_RATIO)] * FRAMES
    assert [len(k) for k in pruned[8]["kept"]] == [3] * FRAMES


def kept(ratio):
    return min(FRAME_TOKENS, max(1, round(ratio * FRAME_TOKENS)))


def test_a_video_at_full_budget_equals_vllm_without_plugin(runs):
    vanilla, pruned = runs
    for key in ("prompt_ids", "tokens", "positions", "embeddings"):
        assert pruned[9][key] == vanilla[2][key], key


def kept_rows(frames):
    """Rows of the unpruned video's embeddings a pruned one holds: each frame's kept tokens, then the newline."""
    return [f * FRAME_TOKENS + j for f, frame in enumerate(frames) for j in frame] + [FRAMES * FRAME_TOKENS]


def test_kept_video_embeddings_are_the_projectors_at_the_kept_indices(runs):
    vanilla, pruned = runs
    (whole,) = vanilla[2]["embeddings"]
    for i in (7, 8):
        (embedding,) = pruned[i]["embeddings"]
        assert all(frame == sorted(set(frame)) for frame in pruned[i]["kept"])
        assert embedding == [whole[r] for r in kept_rows(pruned[i]["kept"])]


def test_an_image_and_a_video_in_one_prompt(runs):
    vanilla, pruned = runs
    image_tokens = 3 * round(RATIO * llava_next.GRID ** 2)  # base + 1 x 2 tiles, RATIO of each tile's 8 x 8
    assert scenario.token_runs(pruned[10], llava_next.TOKEN) == [image_tokens]
    image, video = pruned[10]["embeddings"]
    whole_image, whole_video = vanilla[3]["embeddings"]
    assert len(image) == image_tokens and all(row in whole_image for row in image)
    assert video == [whole_video[r] for r in kept_rows(pruned[10]["kept"][-FRAMES:])]
    length = len(pruned[10]["prompt_ids"])
    assert pruned[10]["positions"][0] == list(range(length))


def test_the_same_video_tokens_as_apply_hiprune(runs):
    # The transformers model of the same checkpoint, request 7's frames through the same video processor,
    # apply_hiprune at the same video ratio: the same kept pooled tokens per frame.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    _, pruned = runs
    path = BUILT["path"]
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    hiprune_ops.apply_hiprune(model, ratio=RATIO, video_ratio=VIDEO_RATIO)
    array, _ = tiny_families.video(100, FRAMES, VIDEO["videos"][0][1:])  # scenario's seed for request 7
    videos = processor.video_processor([array], return_tensors="pt")["pixel_values_videos"]
    ids = torch.tensor([[4, 6] + [VIDEO_TOKEN] * (FRAMES * FRAME_TOKENS + 1)])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=videos)
    assert [i.tolist() for i in integrations.hiprune_state(model).last_video.indices] == pruned[7]["kept"]
