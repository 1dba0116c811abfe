"""Tier 2: HiPrune++ (prompt_beta) in the vLLM plugin for the tiled families (InternVL, Idefics3, SmolVLM, Gemma 3,
PaliGemma) and the AnyRes ones (LLaVA-NeXT, LLaVA-OneVision images), tiny random models on vLLM's CPU build.

As apply_hiprune, every tile (a tile, thumbnail, global image, AnyRes base tile) is its own item: it keeps its
HiPrune tokens plus prompt_extra_count(kept, tokens per tile, beta) tokens most similar to its image's prompt. One
engine per family with a server default budget and prompt_beta, many requests each, in the session's shared
processes: each tile's run of placeholders (InternVL and AnyRes: the image's one run) holds kept + extra; the extras
are the not-kept tokens of highest cosine similarity, recomputed in float64 from the embeddings the language model
received for the same image unpruned (hiprune_budget 0, same engine) and the embedding table; the language model got
exactly those rows; no text, no extra tokens; the same image under two questions never shares a cached encoder output
(prefix caching and the processor cache on). The kept tokens with prompt_beta and with hiprune_prompt_beta 0 are
apply_hiprune's with and without prompt_beta on the transformers model of the same checkpoint, given vLLM's prompt
(the HiPrune reference: no second engine). LLaVA-OneVision's videos, on its engine: each pooled frame holds its
kept + extra tokens (the video's one run, frames x (kept + extra) + 1, the newline last), the extras recomputed from the
unpruned video (hiprune_video_budget 0), and another question's on the same video its own; no text, no extra tokens;
with and without prompt_beta the kept tokens of apply_hiprune on the same frames and prompt.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from prompt_checks import (check_questions_cached_apart, check_video_extras, expected_extras,  # noqa: E402
                           extra_count, prompt_embedding)

BETA = 0.5
ENGINE = {"enable_prefix_caching": True, "mm_processor_cache_gb": 1}
GRID = 8  # the AnyRes models' patches per tile side
# Per family: the server default budget, tokens kept per tile, tokens per tile, tiles of the test image (its
# tiny_families size), and the AnyRes tile columns (None: the unpruned image's embeddings are its tiles' in order).
FAMILIES = {
    "internvl": ({"budget": 6}, 6, 16, 3, None),          # 112 x 224: 2 tiles and the thumbnail
    "idefics3": ({"budget": 6}, 6, 16, 3, None),          # 2 tiles and the global image
    "smolvlm": ({"budget": 6}, 6, 16, 3, None),           # Idefics3's binding, pixel_shuffle 4: as idefics3
    "gemma3": ({"budget": 6}, 6, 16, 1, None),
    "paligemma": ({"budget": 16}, 16, 64, 1, None),
    "llava_next": ({"budget": 48}, 16, 64, 3, 2),         # the base tile and 1 x 2 tiles: 48 // 3 each
    "llava_onevision": ({"budget": 48}, 16, 64, 3, 2),
}
# The families whose prompt without a question still has text: the newline token closing the image or the prompt;
# SmolVLM's <fake_token_around_image> closing the image, which its tiny tokenizer lists in no special ids (transformers'
# SmolVLMProcessor, unlike Idefics3's, does not add it to them).
TEXT_WITHOUT_QUESTION = {"gemma3": tiny_families.GEMMA3_SPECIAL["\n\n"], "paligemma": 151,  # build_paligemma's "\n"
                         "smolvlm": tiny_families.IDEFICS_SPECIAL["<fake_token_around_image>"]}
QUESTION = "what is this"
REQUESTS = {
    "default": {},                                                     # the prompt's own question
    "question": {"question": QUESTION},                                # the same image, another question
    "again": {},                                                       # the first request again (cached)
    "question_again": {"question": QUESTION},
    "no_text": {"question": ""},                                       # no text after the image
    "beta_0": {"mm_processor_kwargs": {"hiprune_prompt_beta": 0}},     # HiPrune for this request
    "beta_1": {"mm_processor_kwargs": {"hiprune_prompt_beta": 1.0}},   # another beta for this request
    "full": {"mm_processor_kwargs": {"hiprune_budget": 0}},            # every token: the reference embeddings
}
FRAMES, FRAME_TOKENS, VIDEO_KEEP = 4, 16, 6  # OneVision's frames: 8 x 8 patches pooled to 4 x 4; 6 kept of them
VIDEO = {"videos": [[FRAMES, 112, 112]]}
VIDEO_TOKEN = tiny_families.FAMILIES["llava_onevision"].video_token


def video_request(**mm_processor_kwargs):
    return dict(VIDEO, mm_processor_kwargs={"hiprune_video_budget": VIDEO_KEEP, **mm_processor_kwargs})


VIDEO_REQUESTS = {  # LLaVA-OneVision only
    "video": video_request(),                                        # the prompt's question
    "video_question": dict(video_request(), question=QUESTION),      # the same video, another question
    "video_beta_0": video_request(hiprune_prompt_beta=0),            # HiPrune
    "video_full": video_request(hiprune_video_budget=0),             # every token: the reference embeddings
    "video_no_text": dict(video_request(), question=""),             # no text after the video
}


def requests_of(name):
    return {**REQUESTS, **(VIDEO_REQUESTS if name == "llava_onevision" else {})}


SHARED_ENGINES = {  # conftest.shared_runs
    f"prompt tiled {name}": scenario.Engine(name, {
        "hf_overrides": {"hiprune": {**default, "prompt_beta": BETA}},
        "engine": dict(ENGINE, limit_mm_per_prompt={"image": 1, "video": 1 if name == "llava_onevision" else 0}),
        "requests": list(requests_of(name).values())}) for name, (default, *_) in FAMILIES.items()}


@pytest.fixture(scope="module")
def engines(shared_runs, tiny_model):
    """name -> (model dir, results by request name) of every family."""
    return {name: (tiny_model(name), dict(zip(requests_of(name), shared_runs[f"prompt tiled {name}"])))
            for name in FAMILIES}


@pytest.fixture(params=list(FAMILIES))
def family(request, engines):
    return request.param, *engines[request.param]


def full_rows(name, tile, indices):
    """Where each token (index on its tile's grid) of a tile sits among the unpruned image's embeddings: tile after
    tile, or (AnyRes) the base tile, then the tiled grid row by row with a newline closing each row."""
    *_, n, _, cols = FAMILIES[name]
    if cols is None:
        return [tile * n + i for i in indices]
    if tile == 0:
        return list(indices)
    row, col = divmod(tile - 1, cols)
    return [GRID * GRID + (row * GRID + i // GRID) * (cols * GRID + 1) + col * GRID + i % GRID for i in indices]


def check_received(arch, results, name, count):
    """Request `name` kept count tokens per tile (in its prompt and its selection) and the language model received
    exactly their rows of the unpruned image, in apply_hiprune's order."""
    _, _, _, tiles, _ = FAMILIES[arch]
    result, full = results[name], results["full"]["embeddings"][0]
    assert sum(scenario.token_runs(result, tiny_families.FAMILIES[arch].image_token)) == tiles * count
    assert len(result["kept"]) == tiles
    rows = []
    for tile, kept in enumerate(result["kept"]):
        assert len(kept) == count and kept == sorted(set(kept)), tile
        rows += full_rows(arch, tile, kept)
    assert torch.allclose(torch.tensor(result["embeddings"][0]), torch.tensor(full)[sorted(rows)], atol=1e-5,
                          rtol=1e-5)


def check_extras(family, name, beta):
    """Per tile: HiPrune's tokens plus the independently recomputed prompt matches, all in the prompt and received
    by the language model. Returns the kept indices per tile."""
    arch, model_dir, results = family
    _, keep, n, _, _ = FAMILIES[arch]
    result, hiprune, full = results[name], results["beta_0"]["kept"], results["full"]["embeddings"][0]
    count = min(extra_count(keep, beta), n - keep)
    assert count > 0
    check_received(arch, results, name, keep + count)
    prompt, text = prompt_embedding(model_dir, result["prompt_ids"], tiny_families.FAMILIES[arch].image_token)
    assert text, "the prompt has text"
    for tile, (kept, base) in enumerate(zip(result["kept"], hiprune)):
        every = [full[row] for row in full_rows(arch, tile, range(n))]
        assert set(base) <= set(kept), tile
        assert sorted(set(kept) - set(base)) == expected_extras(every, base, prompt, count), tile
    return result["kept"]


def apply_hiprune_kept(arch, model_dir, results, beta):
    """Per tile, the kept indices of apply_hiprune at the family's budget and `beta` on the transformers model of
    the same checkpoint, given vLLM's unpruned prompt (the "full" request: the default question) and the same image
    through the same image processor. The special ids of the text rule: the config's and the tokenizer's, as the
    plugin's."""
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    model = getattr(transformers, tiny_families.FAMILIES[arch].architecture).from_pretrained(
        model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    pixels = processor.image_processor([scenario.image(0, tiny_families.FAMILIES[arch].image_size)],
                                       return_tensors="pt")
    hiprune_ops.apply_hiprune(model, budget=FAMILIES[arch][0]["budget"], prompt_beta=beta,
                              prompt_special_ids=processor.tokenizer.all_special_ids)
    ids = torch.tensor([results["full"]["prompt_ids"]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  **{k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "image_sizes") if k in pixels})
    with torch.no_grad():
        if arch == "smolvlm":
            # transformers < 5.20 (vLLM's): SmolVLM's inputs_merger takes whole tiles, so the pruned prompt's
            # forward fails after the selection; apply_hiprune's preparation of it selects the same tokens.
            integrations.hiprune_state(model).prepare(inputs, for_generate=False)
        else:
            model(**inputs)
    # Per tile: the grid families record one index tensor per tile, the AnyRes ones one (tiles, kept) per image.
    return [tile.tolist() for image in integrations.hiprune_state(model).last.indices
            for tile in (image if image.dim() == 2 else [image])]


def test_every_tile_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA)


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0)


def test_beta_0_is_hiprune(family):
    """hiprune_prompt_beta 0: HiPrune's tokens, apply_hiprune's without prompt_beta on the same checkpoint."""
    arch, model_dir, results = family
    check_received(arch, results, "beta_0", FAMILIES[arch][1])
    assert results["beta_0"]["kept"] == apply_hiprune_kept(arch, model_dir, results, 0.0)


def test_the_same_tokens_as_apply_hiprune(family):
    arch, model_dir, results = family
    assert results["default"]["kept"] == apply_hiprune_kept(arch, model_dir, results, BETA)


def test_no_text_no_extra_tokens(family):
    """Nothing after the image: no extra tokens. Except where the rule finds a plain token there: Gemma 3's image
    text ends with "\n\n" and vLLM ends PaliGemma's prompt with "\n", ordinary tokens in these tokenizers (as in the
    released ones), and the tiny SmolVLM's closing marker (TEXT_WITHOUT_QUESTION), so they are the text, apply_hiprune's
    as vLLM's."""
    arch, model_dir, results = family
    token = tiny_families.FAMILIES[arch].image_token
    _, text = prompt_embedding(model_dir, results["no_text"]["prompt_ids"], token)
    if arch in TEXT_WITHOUT_QUESTION:
        assert text == [TEXT_WITHOUT_QUESTION[arch]]
        check_extras(family, "no_text", BETA)
        return
    assert text == []
    check_received(arch, results, "no_text", FAMILIES[arch][1])
    assert results["no_text"]["kept"] == results["beta_0"]["kept"]


# Gemma 3's tiny image leaves 10 tokens per tile after HiPrune and both questions pick the same 3 of them.
@pytest.mark.parametrize("arch", [name for name in FAMILIES if name != "gemma3"])
def test_two_questions_on_one_image_each_get_their_own_tokens(arch, engines):
    """Prefix caching and the processor cache on: the second question's tokens are its own, not the cached first's;
    the same question again gives the same prompt and output, from the caches (its encoder did not run)."""
    family = (arch, *engines[arch])
    results = family[2]
    first, second = check_extras(family, "default", BETA), check_extras(family, "question", BETA)
    check_questions_cached_apart(results, first, second)


# -- LLaVA-OneVision videos: every pooled frame gets its own extra tokens -------------------------------------------
def test_onevision_video_frames_hold_kept_plus_extra_tokens_most_similar_to_the_prompt(engines):
    model_dir, results = engines["llava_onevision"]
    check_video_extras(model_dir, VIDEO_TOKEN, results, "video", VIDEO_KEEP, BETA, newline=True)


def test_two_questions_on_one_onevision_video_each_get_their_own_tokens(engines):
    """Prefix caching and the processor cache on: the second question on the same video gets its own tokens."""
    model_dir, results = engines["llava_onevision"]
    first, second = (check_video_extras(model_dir, VIDEO_TOKEN, results, name, VIDEO_KEEP, BETA, newline=True)
                     for name in ("video", "video_question"))
    assert first != second


def test_onevision_video_without_text_gets_no_extra_tokens(engines):
    results = engines["llava_onevision"][1]
    for name in ("video_no_text", "video_beta_0"):
        assert scenario.token_runs(results[name], VIDEO_TOKEN) == [FRAMES * VIDEO_KEEP + 1], name
        assert [len(kept) for kept in results[name]["kept"]] == [VIDEO_KEEP] * FRAMES, name
    assert results["video_no_text"]["kept"] == results["video_beta_0"]["kept"]


@pytest.mark.parametrize("name,beta", [("video", BETA), ("video_beta_0", 0.0)])
def test_onevision_video_the_same_tokens_as_apply_hiprune(engines, name, beta):
    """apply_hiprune at the same video budget and `beta` on the transformers model of the same checkpoint, on vLLM's
    unpruned prompt of the video ("video_full": the same question), scenario's frames through the same video
    processor: the same kept pooled tokens per frame, extras included."""
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    model_dir, results = engines["llava_onevision"]
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    hiprune_ops.apply_hiprune(model, budget=FAMILIES["llava_onevision"][0]["budget"], video_budget=VIDEO_KEEP,
                              prompt_beta=beta, prompt_special_ids=processor.tokenizer.all_special_ids)
    array, _ = tiny_families.video(100, FRAMES, VIDEO["videos"][0][1:])  # scenario's seed for the first video
    videos = processor.video_processor([array], return_tensors="pt")["pixel_values_videos"]
    ids = torch.tensor([results["video_full"]["prompt_ids"]])
    assert ids[0].tolist().count(VIDEO_TOKEN) == FRAMES * FRAME_TOKENS + 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=videos)
    assert [i.tolist() for i in integrations.hiprune_state(model).last_video.indices] == results[name]["kept"]
