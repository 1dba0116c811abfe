"""Tier 2: HiPrune++ (prompt_beta) in the vLLM plugin for the tiled families (InternVL, Idefics3, Gemma 3, PaliGemma)
and the AnyRes ones (LLaVA-NeXT, LLaVA-OneVision images), tiny random models on vLLM's CPU build.

As apply_hiprune, every tile (a tile, thumbnail, global image, AnyRes base tile) is its own item: it keeps its
HiPrune tokens plus prompt_extra_count(kept, tokens per tile, beta) tokens most similar to its image's prompt. One
engine per family with a server default budget and prompt_beta, many requests each, and one HiPrune engine per
family (the same budget, no prompt_beta), all in one process: each tile's run of placeholders (InternVL and AnyRes:
the image's one run) holds kept + extra; the extras are the not-kept tokens of highest cosine similarity, recomputed
in float64 from the embeddings the language model received for the same image unpruned (hiprune_budget 0 in the same
engine) and the embedding table; the language model got exactly those rows; prompt_beta 0 is HiPrune; no text, no
extra tokens; the same image under two questions never shares a cached encoder output (prefix caching and the
processor cache on); apply_hiprune on the transformers model of the same checkpoint, given vLLM's prompt, keeps the
same tokens. LLaVA-OneVision refuses prompt_beta for a request with a video.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from prompt_checks import check_questions_cached_apart, expected_extras, extra_count, prompt_embedding  # noqa: E402

BETA = 0.5
ENGINE = {"enable_prefix_caching": True, "mm_processor_cache_gb": 1}
GRID = 8  # the AnyRes models' patches per tile side
# Per family: the server default budget, tokens kept per tile, tokens per tile, tiles of the test image (its
# tiny_families size), and the AnyRes tile columns (None: the unpruned image's embeddings are its tiles' in order).
FAMILIES = {
    "internvl": ({"budget": 6}, 6, 16, 3, None),          # 112 x 224: 2 tiles and the thumbnail
    "idefics3": ({"budget": 6}, 6, 16, 3, None),          # 2 tiles and the global image
    "gemma3": ({"budget": 6}, 6, 16, 1, None),
    "paligemma": ({"budget": 16}, 16, 64, 1, None),
    "llava_next": ({"budget": 48}, 16, 64, 3, 2),         # the base tile and 1 x 2 tiles: 48 // 3 each
    "llava_onevision": ({"budget": 48}, 16, 64, 3, 2),
}
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
VIDEO = {"videos": [[4, 112, 112]]}
VIDEO_REQUESTS = {  # LLaVA-OneVision only
    "video": dict(VIDEO),                                                                # refused
    "video_beta_0": dict(VIDEO, mm_processor_kwargs={"hiprune_prompt_beta": 0}),        # served
}


@pytest.fixture(scope="module")
def engines(tiny_model):
    """name -> (model dir, results by request name, the HiPrune engine's result) of every family."""
    jobs, names = [], {}
    for name, (default, *_) in FAMILIES.items():
        requests = {**REQUESTS, **(VIDEO_REQUESTS if name == "llava_onevision" else {})}
        engine = dict(ENGINE, limit_mm_per_prompt={"image": 1, "video": 1 if name == "llava_onevision" else 0})
        jobs.append((tiny_model(name), name, {"hf_overrides": {"hiprune": {**default, "prompt_beta": BETA}},
                                              "engine": engine, "requests": list(requests.values())}))
        jobs.append((tiny_model(name), name, {"hf_overrides": {"hiprune": default}, "engine": engine,
                                              "requests": [{}]}))
        names[name] = list(requests)
    runs = scenario.run_many(jobs)
    return {name: (tiny_model(name), dict(zip(names[name], runs[2 * i])), runs[2 * i + 1][0])
            for i, name in enumerate(FAMILIES)}


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


def check_extras(family, name, beta):
    """Per tile: HiPrune's tokens plus the independently recomputed prompt matches; the prompt holds them all and
    the language model got exactly their rows of the unpruned image. Returns the kept indices per tile."""
    arch, model_dir, results, _ = family
    _, keep, n, tiles, _ = FAMILIES[arch]
    token = tiny_families.FAMILIES[arch].image_token
    result, hiprune, full = results[name], results["beta_0"]["kept"], results["full"]["embeddings"][0]
    count = min(extra_count(keep, beta), n - keep)
    assert count > 0
    assert len(result["kept"]) == len(hiprune) == tiles
    assert sum(scenario.token_runs(result, token)) == tiles * (keep + count)
    prompt, text = prompt_embedding(model_dir, result["prompt_ids"], token)
    assert text, "the prompt has text"
    rows = []
    for tile, (kept, base) in enumerate(zip(result["kept"], hiprune)):
        assert len(kept) == keep + count and kept == sorted(kept) and set(base) <= set(kept), tile
        every = [full[row] for row in full_rows(arch, tile, range(n))]
        assert sorted(set(kept) - set(base)) == expected_extras(every, base, prompt, count), tile
        rows += full_rows(arch, tile, kept)
    # The language model received exactly those tokens of the unpruned image, in apply_hiprune's order.
    received = torch.tensor(result["embeddings"][0])
    assert torch.allclose(received, torch.tensor(full)[sorted(rows)], atol=1e-5, rtol=1e-5)
    return result["kept"]


def test_every_tile_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA)


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0)


def test_beta_0_is_hiprune(family):
    arch, _, results, baseline = family
    _, keep, _, tiles, _ = FAMILIES[arch]
    assert [len(k) for k in results["beta_0"]["kept"]] == [keep] * tiles
    for key in ("kept", "prompt_ids", "tokens", "embeddings"):
        assert results["beta_0"][key] == baseline[key], key


def test_no_text_no_extra_tokens(family):
    arch, _, results, _ = family
    _, keep, _, tiles, _ = FAMILIES[arch]
    assert sum(scenario.token_runs(results["no_text"], tiny_families.FAMILIES[arch].image_token)) == tiles * keep
    assert results["no_text"]["kept"] == results["beta_0"]["kept"]


def test_two_questions_on_one_image_each_get_their_own_tokens(family):
    """Prefix caching and the processor cache on: the second question's tokens are its own, not the cached first's;
    the same question again gives the same prompt and output, from the caches (its encoder did not run)."""
    results = family[2]
    first, second = check_extras(family, "default", BETA), check_extras(family, "question", BETA)
    check_questions_cached_apart(results, first, second)


def test_onevision_refuses_prompt_beta_for_a_video_request(engines):
    results = engines["llava_onevision"][1]
    assert "no HiPrune++ prompt tokens to LLaVA-OneVision videos" in results["video"]["error"]
    assert "error" not in results["video_beta_0"]


def test_the_same_tokens_as_apply_hiprune(family):
    """The transformers model of the same checkpoint, given vLLM's unpruned prompt (the "full" request: the default
    question) and the same image through the same image processor, under apply_hiprune at the same budget and
    prompt_beta: the same kept tokens per tile as vLLM's default request (the text rule read alike)."""
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    arch, model_dir, results, _ = family
    model = getattr(transformers, tiny_families.FAMILIES[arch].architecture).from_pretrained(
        model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    pixels = processor.image_processor([scenario.image(0, tiny_families.FAMILIES[arch].image_size)],
                                       return_tensors="pt")
    hiprune_ops.apply_hiprune(model, budget=FAMILIES[arch][0]["budget"], prompt_beta=BETA)
    ids = torch.tensor([results["full"]["prompt_ids"]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids),
              **{key: pixels[key] for key in ("pixel_values", "pixel_attention_mask", "image_sizes") if key in pixels})
    # Per tile: the grid families record one index tensor per tile, the AnyRes ones one (tiles, kept) per image.
    kept = [tile.tolist() for image in integrations.hiprune_state(model).last.indices
            for tile in (image if image.dim() == 2 else [image])]
    assert kept == results["default"]["kept"]
