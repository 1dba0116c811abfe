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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import prompt_checks  # noqa: E402
import scenario  # noqa: E402
import tiny_families  # noqa: E402
import tiny_models  # noqa: E402
from prompt_checks import BETA, check_extras  # noqa: E402
# Collected here, on this file's families.
from prompt_checks import (test_bad_request_beta_fails_that_request_only, test_beta_0_is_hiprune,  # noqa: E402, F401
                           test_no_text_no_extra_tokens)

# Per family: its placeholder id, the server default budget / ratio, the budget kept per image, the request that
# keeps every token.
FAMILIES = {
    "llava": (tiny_models.LLAVA_IMAGE, {"budget": 16}, 16, {"hiprune_budget": 0}),
    "qwen": (tiny_models.QWEN_IMAGE, {"ratio": 0.25}, 6, {"hiprune_ratio": 1.0}),
    "qwen2_vl": (tiny_families.FAMILIES["qwen2_vl"].image_token, {"ratio": 0.25}, 6, {"hiprune_ratio": 1.0}),
}


@pytest.fixture(scope="module")
def engines(tiny_model):
    """arch -> (model dir, results by request name, the baseline's result) of every family: each family's engine
    with prompt_beta and its baseline without, all in one process (scenario.py's sharing pattern)."""
    return prompt_checks.run_engines(tiny_model, {arch: (default, full)
                                                  for arch, (_, default, _, full) in FAMILIES.items()})


@pytest.fixture(params=list(FAMILIES))
def family(request, engines):
    arch = request.param
    token, _, keep, _ = FAMILIES[arch]
    model_dir, results, baseline = engines[arch]
    return arch, model_dir, token, keep, results, baseline


def test_prompt_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA)


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0)


def test_two_questions_on_one_image_each_get_their_own_tokens(family):
    prompt_checks.check_two_questions(family)
