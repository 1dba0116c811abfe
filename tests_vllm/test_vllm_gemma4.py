"""Tier 2 for the Gemma 4 binding: images of their own soft-token counts, padded patches left out of the scores,
the scores pooled 3 x 3 by position like the features, the run between <start_of_image> and <end_of_image> shrunk.

The tiny model (tiny_families.build_gemma4): 16 px patches pooled 3 x 3, at most 70 soft tokens per image (a
224 x 224 image: 8 x 8 = 64, a 112 x 224 one fewer, both padded to 630 patches). One engine without the plugin and
one with it (conftest.shared_runs), every case reading the same runs; the kept tokens are also compared with apply_hiprune's
on the transformers model of the same checkpoint. Videos on the same engines: each frame an image of its own (224 x 224
frames: 64 soft tokens each), with its run of video placeholders between the same markers, pruned per frame.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept  # noqa: E402

TOKEN = tiny_families.GEMMA4_SPECIAL["<image_soft_token>"]
BOI, EOI = tiny_families.GEMMA4_SPECIAL["<start_of_image>"], tiny_families.GEMMA4_SPECIAL["<end_of_image>"]
VIDEO_TOKEN = tiny_families.GEMMA4_SPECIAL["<|video|>"]
RATIO, VIDEO_RATIO = 0.25, 0.5
TWO = {"images": [[224, 224], [112, 224]], "image_seed": 10}
FRAMES, FRAME_TOKENS = 4, 64
VIDEO = {"videos": [[FRAMES, 224, 224]]}
BOTH = dict(VIDEO, images=[[112, 224]], image_seed=20)  # an image, then a video, in one prompt


def token_runs(result, token=TOKEN):
    """Placeholders per image (per video frame): the runs of `token`, each with the marker before and after it."""
    ids, runs = result["prompt_ids"], []
    for i, t in enumerate(ids):
        if t == token and ids[i - 1] != token:
            runs.append([ids[i - 1], 0])
        if t == token:
            runs[-1][1] += 1
        elif runs and ids[i - 1] == token:
            runs[-1].append(t)
    return [(before, n, after) for before, n, after in runs]


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 1}, "max_model_len": 1024}
SHARED_ENGINES = scenario.engine_pairs({"gemma4": ("gemma4",  # conftest.shared_runs
    {"engine": ENGINE, "requests": [{}, TWO, VIDEO, BOTH]},
    {"engine": ENGINE, "hf_overrides": {"hiprune": {"ratio": RATIO, "video_ratio": VIDEO_RATIO}}, "requests": [
        *scenario.image_requests(TWO, 5),  # 0 to 5
        {"mm_processor_kwargs": {"hiprune_budget": 1000}},               # 6 clamped
        {"mm_processor_kwargs": {"hiprune_ratio": 1.5}},                 # 7 refused
        dict(VIDEO),                                                     # 8 video
        dict(VIDEO, mm_processor_kwargs={"hiprune_video_budget": 5}),    # 9
        dict(VIDEO, mm_processor_kwargs={"hiprune_video_ratio": 1.0}),   # 10
        dict(BOTH),                                                      # 11 both
        dict(VIDEO, mm_processor_kwargs={"hiprune_video_ratio": 2}),     # 12
    ]})})


@pytest.fixture(scope="module")
def runs(shared_runs, tiny_model):
    return (*shared_runs.pair("gemma4"), tiny_model("gemma4"))


def full_counts(vanilla):
    return [n for _, n, _ in token_runs(vanilla[0])], [n for _, n, _ in token_runs(vanilla[1])]


def test_placeholders_per_image_and_per_request(runs):
    vanilla, pruned, _ = runs
    one, two = full_counts(vanilla)
    assert one == [64] and len(two) == 2 and two[0] == 64 and two[1] < 64  # vLLM's own counts
    expected = [[kept(RATIO, one[0])], one, [5], [kept(RATIO, one[0])], [kept(RATIO, n) for n in two], two, one]
    assert [[n for _, n, _ in token_runs(r)] for r in pruned[:7]] == expected
    assert all((before, after) == (BOI, EOI) for r in pruned[:7] for before, _, after in token_runs(r))
    # Request 3 repeats request 0's image and budget: vLLM's encoder cache answers it, the encoder does not run.
    pruned_images = [counts if counts != full else None for counts, full in zip(expected, [one, one, one, one, two,
                                                                                          two, one])]
    assert [[len(i) for i in r["kept"]] for r in pruned[:7]] == [
        [] if i == 3 or counts is None else counts for i, counts in enumerate(pruned_images)]
    assert pruned[3]["tokens"] == pruned[0]["tokens"]  # the override did not stick


def test_a_bad_request_value_is_refused_for_that_request(runs):
    _, pruned, _ = runs
    assert "hiprune_ratio" in pruned[7]["error"]


def test_full_budget_equals_vllm_without_plugin(runs):
    vanilla, pruned, _ = runs
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[5], vanilla[1]), (pruned[6], vanilla[0])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"] == theirs["positions"]
        assert ours["embeddings"] == theirs["embeddings"]


def test_kept_embeddings_are_the_towers_at_the_kept_indices(runs):
    vanilla, pruned, _ = runs
    for ours, full in ((pruned[0], vanilla[0]), (pruned[2], vanilla[0]), (pruned[4], vanilla[1])):
        assert len(ours["kept"]) == len(full["embeddings"]) == len(ours["embeddings"])
        for embedding, whole, indices in zip(ours["embeddings"], full["embeddings"], ours["kept"]):
            assert indices == sorted(set(indices))
            assert embedding == [whole[i] for i in indices]  # bit for bit: gathered, not recomputed


def test_kept_tokens_take_consecutive_positions(runs):
    _, pruned, _ = runs
    for result in pruned[:7]:
        length = len(result["prompt_ids"])
        assert result["positions"][0] == list(range(length))
        assert result["positions"][1] == [length]


def test_the_same_tokens_as_apply_hiprune(runs):
    # The transformers model of the same checkpoint, the same images and video frames through the same processor,
    # apply_hiprune at the same ratios: the same kept soft tokens per image and per frame.
    Image = pytest.importorskip("PIL.Image")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    _, pruned, path = runs
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    hiprune_ops.apply_hiprune(model, ratio=RATIO, video_ratio=VIDEO_RATIO)
    size = tiny_families.FAMILIES["gemma4"].image_size
    images = [scenario.image(0, size)] + [scenario.image(10 + i, s) for i, s in enumerate(TWO["images"])]
    inputs = processor.image_processor(images, return_tensors="pt")
    # Request 8's video (scenario's seed), its frames made as vLLM makes them: images of at most 70 soft tokens.
    array, _ = tiny_families.video(100, FRAMES, VIDEO["videos"][0][1:])
    frames = processor.image_processor([Image.fromarray(frame) for frame in array], max_soft_tokens=70,
                                       return_tensors="pt")
    with torch.no_grad():
        ids = [4, 6]
        for token, n in [(TOKEN, n) for n in inputs["num_soft_tokens_per_image"].tolist()] + \
                [(VIDEO_TOKEN, n) for n in frames["num_soft_tokens_per_image"].tolist()]:
            ids += [BOI] + [token] * n + [EOI]
        ids = torch.tensor([ids])
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
              image_position_ids=inputs["image_position_ids"], pixel_values_videos=frames["pixel_values"],
              video_position_ids=frames["image_position_ids"], num_frames_per_video=torch.tensor([FRAMES]))
    state = integrations.hiprune_state(model)
    assert [i.tolist() for i in state.last.indices] == pruned[0]["kept"] + pruned[4]["kept"]
    assert [i.tolist() for i in state.last_video.indices] == pruned[8]["kept"]


# -- videos --------------------------------------------------------------------------------------------------------
def video_runs(result):
    """(marker before, placeholders, marker after) per frame of the prompt's video."""
    return token_runs(result, VIDEO_TOKEN)


def test_video_frames_keep_their_count_each_between_their_markers(runs):
    vanilla, pruned, _ = runs
    assert video_runs(vanilla[2]) == [(BOI, FRAME_TOKENS, EOI)] * FRAMES  # vLLM's own layout: a run per frame
    expected = {8: kept(VIDEO_RATIO, FRAME_TOKENS), 9: 5, 10: FRAME_TOKENS, 11: kept(VIDEO_RATIO, FRAME_TOKENS)}
    for i, per_frame in expected.items():
        assert video_runs(pruned[i]) == [(BOI, per_frame, EOI)] * FRAMES, i
    # Only the placeholders shrink: the timestamps and markers between the frames stay.
    shrunk = [t for t in vanilla[2]["prompt_ids"] if t != VIDEO_TOKEN]
    assert [t for t in pruned[8]["prompt_ids"] if t != VIDEO_TOKEN] == shrunk
    assert [len(k) for k in pruned[8]["kept"]] == [kept(VIDEO_RATIO, FRAME_TOKENS)] * FRAMES


def test_a_bad_video_value_is_refused_for_that_request(runs):
    _, pruned, _ = runs
    assert "hiprune_video_ratio" in pruned[12]["error"]


def test_a_video_at_full_budget_equals_vllm_without_plugin(runs):
    vanilla, pruned, _ = runs
    for key in ("prompt_ids", "tokens", "positions", "embeddings"):
        assert pruned[10][key] == vanilla[2][key], key


def test_kept_video_embeddings_are_the_towers_at_the_kept_indices(runs):
    vanilla, pruned, _ = runs
    (whole,) = vanilla[2]["embeddings"]
    for i in (8, 9):
        (embedding,) = pruned[i]["embeddings"]
        rows = [f * FRAME_TOKENS + j for f, frame in enumerate(pruned[i]["kept"]) for j in frame]
        assert all(frame == sorted(set(frame)) for frame in pruned[i]["kept"])
        assert embedding == [whole[r] for r in rows]


def test_an_image_and_a_video_in_one_prompt(runs):
    vanilla, pruned, _ = runs
    image_full, = [n for _, n, _ in token_runs(vanilla[3])]
    assert [n for _, n, _ in token_runs(pruned[11])] == [kept(RATIO, image_full)]
    image, video = pruned[11]["embeddings"]
    whole_image, whole_video = vanilla[3]["embeddings"]
    frames = pruned[11]["kept"][-FRAMES:]
    assert len(image) == kept(RATIO, image_full) and all(row in whole_image for row in image)
    assert video == [whole_video[f * FRAME_TOKENS + j] for f, frame in enumerate(frames) for j in frame]
    length = len(pruned[11]["prompt_ids"])
    assert pruned[11]["positions"][0] == list(range(length))
