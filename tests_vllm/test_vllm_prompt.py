"""Tier 2: HiPrune++ (prompt_beta) in the vLLM plugin, LLaVA-1.5, Qwen2.5-VL and Qwen2-VL (tiny random models, vLLM
CPU).

One engine per family with the server default prompt_beta and many requests on one image (seed 0), every engine of
the file in one process: the prompt holds N' + t placeholders; the t extra tokens are the not-kept tokens most
similar to the prompt, recomputed here in float64 from the embeddings the language model received (those of the
same image unpruned, hiprune_budget / hiprune_ratio off) and the language model's embedding table; the same image
under two questions never shares a cached encoder output (prefix caching and the processor cache on); prompt_beta 0
is HiPrune; a prompt without text gets no extra tokens; a bad hiprune_prompt_beta fails its request only. Another
binding refuses prompt_beta.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
import tiny_models  # noqa: E402
from prompt_checks import check_questions_cached_apart, expected_extras, extra_count, prompt_embedding  # noqa: E402

BETA = 0.5
ENGINE = {"enable_prefix_caching": True, "mm_processor_cache_gb": 1}
# Per family: its placeholder id, the server default budget / ratio, the budget kept per image, the request that
# keeps every token.
FAMILIES = {
    "llava": (tiny_models.LLAVA_IMAGE, {"budget": 16}, 16, {"hiprune_budget": 0}),
    "qwen": (tiny_models.QWEN_IMAGE, {"ratio": 0.25}, 6, {"hiprune_ratio": 1.0}),
    "qwen2_vl": (tiny_families.FAMILIES["qwen2_vl"].image_token, {"ratio": 0.25}, 6, {"hiprune_ratio": 1.0}),
}
QUESTION = "what is this"
REQUESTS = {
    "default": {},                                                   # the prompt's own question
    "question": {"question": QUESTION},                              # the same image, another question
    "again": {},                                                     # the first request again (cached)
    "no_text": {"question": ""},                                     # no text after the image
    "beta_0": {"mm_processor_kwargs": {"hiprune_prompt_beta": 0}},   # HiPrune for this request
    "beta_1": {"mm_processor_kwargs": {"hiprune_prompt_beta": 1.0}},  # another beta for this request
    "bad": {"mm_processor_kwargs": {"hiprune_prompt_beta": 1.5}},    # refused, the server goes on
    "full": {},                                                      # every token (set per family)
    "question_again": {"question": QUESTION},
}


@pytest.fixture(scope="module")
def engines(tiny_model):
    """arch -> (model dir, results by request name, the baseline's result) of every family: each family's engine
    with prompt_beta and its baseline without, all in one process (scenario.py's sharing pattern)."""
    jobs = []
    for arch, (_, default, _, full) in FAMILIES.items():
        requests = {**REQUESTS, "full": {"mm_processor_kwargs": full}}
        jobs.append((tiny_model(arch), arch, {"hf_overrides": {"hiprune": {**default, "prompt_beta": BETA}},
                                              "engine": ENGINE, "requests": list(requests.values())}))
        jobs.append((tiny_model(arch), arch, {"hf_overrides": {"hiprune": default}, "engine": ENGINE,
                                              "requests": [{}]}))
    runs = scenario.run_many(jobs)
    return {arch: (tiny_model(arch), dict(zip(REQUESTS, runs[2 * i])), runs[2 * i + 1][0])
            for i, arch in enumerate(FAMILIES)}


@pytest.fixture(params=list(FAMILIES))
def family(request, engines):
    arch = request.param
    token, _, keep, _ = FAMILIES[arch]
    model_dir, results, baseline = engines[arch]
    return arch, model_dir, token, keep, results, baseline


def check_extras(family_result, name, beta):
    arch, model_dir, token, keep, results, _ = family_result
    result, hiprune = results[name], results["beta_0"]["kept"][0]
    kept = result["kept"][0]
    count = extra_count(keep, beta)
    assert len(kept) == keep + count == scenario.token_runs(result, token)[0]
    assert set(hiprune) <= set(kept) and kept == sorted(kept)
    prompt, text = prompt_embedding(model_dir, result["prompt_ids"], token)
    assert text, "the prompt has text"
    extras = sorted(set(kept) - set(hiprune))
    assert extras == expected_extras(results["full"]["embeddings"][0], hiprune, prompt, count)
    # The language model received exactly those tokens of the unpruned image, in raster order.
    full = torch.tensor(results["full"]["embeddings"][0])
    assert torch.allclose(torch.tensor(result["embeddings"][0]), full[kept], atol=1e-5, rtol=1e-5)
    return kept


def test_prompt_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA)


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0)


def test_two_questions_on_one_image_each_get_their_own_tokens(family):
    """Prefix caching and the processor cache on: the second question's tokens are its own, not the cached first's;
    the same question again gives the same prompt, tokens and output."""
    results = family[4]
    first, second = check_extras(family, "default", BETA), check_extras(family, "question", BETA)
    check_questions_cached_apart(results, first, second)


def test_beta_0_is_hiprune(family):
    _, _, token, keep, results, baseline = family
    assert results["beta_0"]["kept"] == baseline["kept"]
    assert len(results["beta_0"]["kept"][0]) == keep
    for key in ("prompt_ids", "tokens", "embeddings"):
        assert results["beta_0"][key] == baseline[key], key


def test_no_text_no_extra_tokens(family):
    _, _, token, keep, results, _ = family
    assert scenario.token_runs(results["no_text"], token) == [keep]
    assert results["no_text"]["kept"] == results["beta_0"]["kept"]


def test_bad_request_beta_fails_that_request_only(family):
    results = family[4]
    assert "hiprune_prompt_beta must be a number in [0, 1]" in results["bad"]["error"]
    assert "error" not in results["full"]


def test_a_binding_without_prompt_tokens_refuses_prompt_beta(tiny_model):
    """Mistral 3 (tiny family) keeps refusing prompt_beta at start, naming itself."""
    arch = "mistral3"
    model_dir = tiny_model(arch)
    out = scenario.run(model_dir, arch, {"hf_overrides": {"hiprune": {"budget": 16, "prompt_beta": 0.1}},
                                         "requests": [{}]}, expect_failure=True)
    assert "prompt_beta: the vLLM plugin adds no HiPrune++ prompt tokens for Mistral3ForConditionalGeneration" in out
    served, refused = scenario.run(model_dir, arch, {"hf_overrides": {"hiprune": {"budget": 16}}, "requests": [
        {}, {"mm_processor_kwargs": {"hiprune_prompt_beta": 0.1}}]})
    assert "error" not in served
    assert "hiprune_prompt_beta: the vLLM plugin adds no HiPrune++ prompt tokens for this model" in refused["error"]
