"""Tier 2: HiPrune++ (prompt_beta) in the vLLM plugin: LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (-MoE), Qwen3.5
(-MoE), GLM-4.1V / 4.5V images, and the video slices of Qwen2-VL, Qwen3-VL and GLM-4.1V (tiny random models, vLLM
CPU).

One engine per family with the server default prompt_beta and many requests on one image (seed 0) or one video, in
the session's shared processes (conftest.shared_runs): the prompt holds N' + t placeholders per image and per video
slice; the t extra tokens are the not-kept tokens most similar to the prompt, recomputed here in float64 from the
embeddings the language model received (those of the same image or video unpruned, hiprune_ratio /
hiprune_video_ratio 1.0; only the language model's width: Qwen3-VL's deepstack levels follow in each row, checked at
the same indices) and the language model's embedding table; the same image or video under two questions never shares
a cached encoder output (prefix caching and the processor cache on); prompt_beta 0 is HiPrune (for the first three
families: the same as an engine without prompt_beta); a prompt without text gets no extra tokens; a bad
hiprune_prompt_beta fails its request only; video slices keep their markers and the kept tokens their unpruned M-RoPE
positions. Qwen2-VL runs on a copy whose generation config names one more eos (a plain word, as Qwen's <|endoftext|>
is only there): the prompt text ends before it, as apply_hiprune's. GLM-4.1V runs on a copy whose tokenizer reads
digits as words: the timestamp its video prompt writes after every frame is text, and the prompt text is still the
question after the video, in vLLM and in apply_hiprune.
"""

import json
import os
import shutil
import sys
from typing import NamedTuple, Optional

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import prompt_checks  # noqa: E402
import scenario  # noqa: E402
import tiny_families  # noqa: E402
import tiny_models  # noqa: E402
from prompt_checks import (BASELINE, BETA, ENGINE, QUESTION, REQUESTS, check_questions_cached_apart,  # noqa: E402
                           extra_count)
from test_vllm_video import expected_positions  # noqa: E402  (the unpruned run's positions at the kept tokens)

WIDTH = tiny_families.TEXT["hidden_size"]  # the features ranked: the language model's width
QWEN_RATIO = ({"ratio": 0.25}, 6, {"hiprune_ratio": 1.0})  # 6 x 4 merged tokens per image or video slice


class Case(NamedTuple):
    token: int              # the image placeholder id
    default: dict           # the server default budget / ratio
    keep: int               # tokens kept per image (and per video slice)
    full: dict              # the request keeping every token of the image
    baseline: bool = False  # also run an engine without prompt_beta: beta 0 must equal it


def image_token(name):
    return tiny_families.FAMILIES[name].image_token


FAMILIES = {
    "llava": Case(tiny_models.LLAVA_IMAGE, {"budget": 16}, 16, {"hiprune_budget": 0}, baseline=True),
    "qwen": Case(tiny_models.QWEN_IMAGE, *QWEN_RATIO, baseline=True),
    **{name: Case(image_token(name), *QWEN_RATIO, baseline=name == "qwen2_vl")
       for name in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")},
}
# Families whose videos are served too: whether each slice has its own run of placeholders (Qwen3-VL's and GLM's,
# between timestamps) or the video one run (Qwen2-VL).
VIDEO_FAMILIES = {"qwen2_vl": False, "qwen3_vl": True, "glm4v": True}
FRAMES, SLICES = 4, 2  # temporal_patch_size 2
# Qwen2-VL's copy: its generation config's eos list adds EOS_WORD; EOS_QUESTION holds it mid-question.
EOS_FAMILY, EOS_WORD = "qwen2_vl", 200
EOS_QUESTION = f"a picture w{EOS_WORD} what is this"  # its text, "a picture", is no other request's (else cached)
# GLM-4.1V's copy: its tokenizer reads digits as words (ids of w-words no request uses), so the timestamp GLM's
# video prompt writes after every frame is text, as in a released tokenizer (the tiny one reads <unk>); the last one
# follows the last frame. The prompt text is the question after the video: VIDEO_END, the token it follows.
TIMESTAMP_FAMILY, DIGIT_IDS = "glm4v", {str(d): 240 + d for d in range(10)}
VIDEO_END = {TIMESTAMP_FAMILY: tiny_families.GLM_IDS["video_end_token_id"]}
VIDEO_REQUESTS = {
    "video": {},
    "video_question": {"question": QUESTION},
    "video_question_again": {"question": QUESTION},
    "video_no_text": {"question": ""},
    "video_beta_0": {"mm_processor_kwargs": {"hiprune_prompt_beta": 0}},
    "video_full": {"mm_processor_kwargs": {"hiprune_video_ratio": 1.0}},
}


def requests_of(name):
    requests = {**REQUESTS, "full": {"mm_processor_kwargs": FAMILIES[name].full}}
    if name == EOS_FAMILY:
        requests["eos"] = {"question": EOS_QUESTION}
    if name in VIDEO_FAMILIES:
        video = {"videos": [[FRAMES, *tiny_families.FAMILIES[name].image_size]]}
        requests.update({key: dict(request, **video) for key, request in VIDEO_REQUESTS.items()})
    return requests


def engine_of(name):
    engine = dict(ENGINE)
    if name in tiny_families.FAMILIES:
        engine.update(tiny_families.FAMILIES[name].engine)  # Qwen3.5: bfloat16
    if name in VIDEO_FAMILIES:
        engine["limit_mm_per_prompt"] = {"image": 1, "video": 1}
    return engine


def with_generation_eos(model_dir, folder):
    """A copy of model_dir whose generation_config.json adds EOS_WORD to its eos ids (config.json unchanged)."""
    shutil.copytree(model_dir, folder)
    path = os.path.join(folder, "generation_config.json")
    config = {}
    if os.path.exists(path):
        with open(path) as f:
            config = json.load(f)
    eos = config.get("eos_token_id", tiny_families.TEXT["eos_token_id"])
    config["eos_token_id"] = (eos if isinstance(eos, list) else [eos]) + [EOS_WORD]
    with open(path, "w") as f:
        json.dump(config, f)
    return str(folder)


def with_digit_words(model_dir, folder):
    """A copy of model_dir whose tokenizer maps the digits to DIGIT_IDS (those ids' w-words renamed)."""
    shutil.copytree(model_dir, folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    for digit, index in DIGIT_IDS.items():
        assert vocab.pop(f"w{index}") == index
        vocab[digit] = index
    with open(path, "w") as f:
        json.dump(tokenizer, f)
    return str(folder)


MODEL_COPIES = {EOS_FAMILY: with_generation_eos, TIMESTAMP_FAMILY: with_digit_words}  # name -> its copy's maker


class Served(NamedTuple):
    name: str
    model_dir: str
    case: Case
    results: dict               # by request name
    baseline: Optional[dict]    # the engine without prompt_beta, its one request


def _shared_engines() -> dict:
    """Per family its engine with prompt_beta (named "prompt qwen " + name) and, for some, its baseline without."""
    engines = {}
    for name, case in FAMILIES.items():
        variant = MODEL_COPIES.get(name)
        engines[f"prompt qwen {name}"] = scenario.Engine(name, {
            "hf_overrides": {"hiprune": {**case.default, "prompt_beta": BETA}}, "engine": engine_of(name),
            "requests": list(requests_of(name).values())}, variant=variant)
        if case.baseline:
            engines[f"prompt qwen {name}{BASELINE}"] = scenario.Engine(name, {
                "hf_overrides": {"hiprune": case.default}, "engine": engine_of(name), "requests": [{}]},
                variant=variant)
    return engines


SHARED_ENGINES = _shared_engines()  # conftest.shared_runs


@pytest.fixture(scope="module")
def engines(shared_runs):
    """name -> Served of every family."""
    return {name: Served(name, shared_runs.model_dir(f"prompt qwen {name}"), case,
                         dict(zip(requests_of(name), shared_runs[f"prompt qwen {name}"])),
                         shared_runs[f"prompt qwen {name}{BASELINE}"][0] if case.baseline else None)
            for name, case in FAMILIES.items()}


@pytest.fixture(params=list(FAMILIES))
def family(request, engines):
    return engines[request.param]


@pytest.fixture(params=list(VIDEO_FAMILIES))
def video_family(request, engines):
    return engines[request.param]


def prompt_embedding(served, prompt_ids, token):
    """prompt_checks.prompt_embedding on the served model, its table rounded to the engine's dtype."""
    return prompt_checks.prompt_embedding(served.model_dir, prompt_ids, token, dtype=engine_dtype(served))


def engine_dtype(served):
    return getattr(torch, engine_of(served.name).get("dtype", "float32"))  # Qwen3.5: bfloat16


def expected_extras(full_embeddings, kept, prompt, count):
    """prompt_checks.expected_extras on the language model's width (the rows may hold Qwen3-VL's deepstack levels
    after it)."""
    return prompt_checks.expected_extras(torch.as_tensor(full_embeddings, dtype=torch.float64)[:, :WIDTH], kept,
                                         prompt, count)


def placeholder_runs(served, per_slice, video=False):
    """The expected runs of placeholders: an image's one, a video's one per slice (Qwen2-VL: one for the video)."""
    if not video:
        return [per_slice]
    return [per_slice] * SLICES if VIDEO_FAMILIES[served.name] else [per_slice * SLICES]


def video_token(served):
    return tiny_families.FAMILIES[served.name].video_token


def check_extras(served, name, beta, video=False):
    """Per image or video slice of request `name`: keep + t tokens, HiPrune's (the beta 0 request's) and the t
    not-kept ones most similar to the prompt; the language model got the unpruned rows at them (every channel:
    deepstack levels included), and the prompt that many placeholders per slice. Returns the kept indices."""
    prefix = "video_" if video else ""
    token = video_token(served) if video else served.case.token
    result, results = served.results[name], served.results
    kept_slices, base_slices = result["kept"], results[prefix + "beta_0"]["kept"]
    full = torch.tensor(results[prefix + "full"]["embeddings"][0])
    slices = SLICES if video else 1
    plane = full.shape[0] // slices
    count = extra_count(served.case.keep, beta)
    assert count > 0 and len(kept_slices) == len(base_slices) == slices
    assert scenario.token_runs(result, token) == placeholder_runs(served, served.case.keep + count, video)
    prompt, text = prompt_embedding(served, result["prompt_ids"], VIDEO_END.get(served.name, token) if video else token)
    assert text, "the prompt has text"
    for s, (kept, base) in enumerate(zip(kept_slices, base_slices)):
        assert len(kept) == served.case.keep + count and len(base) == served.case.keep
        assert set(base) <= set(kept) and kept == sorted(kept)
        extras = sorted(set(kept) - set(base))
        assert extras == expected_extras(full[s * plane:(s + 1) * plane], base, prompt, count), s
    rows = [s * plane + i for s, kept in enumerate(kept_slices) for i in kept]
    assert torch.allclose(torch.tensor(result["embeddings"][0]), full[rows], atol=1e-5, rtol=1e-5)
    return kept_slices


def test_prompt_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA)


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_rows_follow_the_kept_tokens(engines, name):
    """Qwen3-VL's rows carry its deepstack levels after the language model's width; check_extras compares every
    channel, so they are the unpruned rows' at the same kept indices, extras included."""
    served = engines[name]
    levels = 2  # tiny_families: deepstack_visual_indexes=[1, 2]
    for request, video in (("default", False), ("video", True)) if name in VIDEO_FAMILIES else (("default", False),):
        assert len(served.results[request]["embeddings"][0][0]) == WIDTH * (1 + levels)
        check_extras(served, request, BETA, video=video)


def test_two_questions_on_one_image_each_get_their_own_tokens(family):
    """Prefix caching and the processor cache on: the second question's tokens are its own, not the cached first's;
    the same question again gives the same prompt, tokens and output."""
    if family.name.startswith("qwen3_5"):
        pytest.skip("the tiny Qwen3.5 tokenizer (transformers' Qwen3_5Tokenizer on the word-level vocabulary) turns "
                    "both questions into the same ids, so they share their cache entries by design")
    first, second = check_extras(family, "default", BETA), check_extras(family, "question", BETA)
    check_questions_cached_apart(family.results, first, second)


def test_beta_0_is_hiprune(family):
    results, keep = family.results, family.case.keep
    assert [len(k) for k in results["beta_0"]["kept"]] == [keep]
    assert scenario.token_runs(results["beta_0"], family.case.token) == [keep]
    if family.baseline is not None:
        for key in ("prompt_ids", "tokens", "embeddings", "kept"):
            assert results["beta_0"][key] == family.baseline[key], key


def test_no_text_no_extra_tokens(family):
    results, keep = family.results, family.case.keep
    assert scenario.token_runs(results["no_text"], family.case.token) == [keep]
    assert results["no_text"]["kept"] == results["beta_0"]["kept"]


def test_bad_request_beta_fails_that_request_only(family):
    results = family.results
    assert "hiprune_prompt_beta must be a number in [0, 1]" in results["bad"]["error"]
    assert "error" not in results["full"]


def test_the_generation_configs_eos_ends_the_prompt_text(engines):
    """Qwen2-VL's copy names EOS_WORD an eos in generation_config.json only: the prompt text is the words before
    it (as apply_hiprune's, which reads the generation config), and the tokens it picks are not those the whole
    question would pick."""
    served = engines[EOS_FAMILY]
    ids = served.results["eos"]["prompt_ids"]
    at = ids.index(EOS_WORD)
    prompt, text = prompt_embedding(served, ids, served.case.token)
    assert text == ids[at - 2:at]  # "a picture"
    check_extras(served, "eos", BETA)
    # Where it matters: the whole question (the text without the generation config's eos) picks other tokens.
    whole = prompt_checks.embedding_table(served.model_dir, engine_dtype(served))[ids[at - 2:]].mean(0)
    full, base = served.results["full"]["embeddings"][0], served.results["beta_0"]["kept"][0]
    count = extra_count(served.case.keep, BETA)
    assert expected_extras(full, base, whole, count) != expected_extras(full, base, prompt, count)


# -- videos: every temporal slice gets its own extra tokens ---------------------------------------------------------
def test_video_slices_hold_kept_plus_extra_tokens(video_family):
    check_extras(video_family, "video", BETA, video=True)


def test_glm_video_timestamps_are_not_prompt_text(engines):
    """GLM's video prompt: per frame <|begin_of_image|> placeholders <|end_of_image|> and its timestamp (text in this
    copy), then <|end_of_video|> and the question. Each slice's extra tokens are the question's, not the last
    timestamp's (which here picks others)."""
    import transformers

    served = engines[TIMESTAMP_FAMILY]
    ids, end = served.results["video"]["prompt_ids"], VIDEO_END[TIMESTAMP_FAMILY]
    last_frame = max(i for i, t in enumerate(ids) if t == video_token(served))
    assert ids[last_frame + 2:ids.index(end)] == [DIGIT_IDS["1"]]  # after <|end_of_image|>: 1 second
    question = transformers.AutoTokenizer.from_pretrained(served.model_dir).encode(
        tiny_families.GLM_VIDEO_PROMPT.split("> ")[-1], add_special_tokens=False)
    assert prompt_embedding(served, ids, end)[1] == question == ids[ids.index(end) + 1:]
    check_extras(served, "video", BETA, video=True)
    # Where it matters: the timestamp as the prompt text would pick other tokens.
    table = prompt_checks.embedding_table(served.model_dir)
    full, base = torch.tensor(served.results["video_full"]["embeddings"][0]), served.results["video_beta_0"]["kept"]
    plane, count = full.shape[0] // SLICES, extra_count(served.case.keep, BETA)
    picks = [[expected_extras(full[s * plane:(s + 1) * plane], base[s], table[text].mean(0), count)
              for s in range(SLICES)] for text in (question, [DIGIT_IDS["1"]])]
    assert picks[0] != picks[1]


def test_two_questions_on_one_video_each_get_their_own_tokens(video_family):
    results = video_family.results
    first = check_extras(video_family, "video", BETA, video=True)
    second = check_extras(video_family, "video_question", BETA, video=True)
    assert first != second
    again, twin = results["video_question_again"], results["video_question"]
    for key in ("prompt_ids", "tokens"):
        assert again[key] == twin[key], key
    # Served from the caches, or encoded again: never the other question's tokens.
    assert again["kept"] in ([], twin["kept"])


def test_video_without_text_or_with_beta_0_gets_no_extra_tokens(video_family):
    results, keep, token = video_family.results, video_family.case.keep, video_token(video_family)
    for name in ("video_no_text", "video_beta_0"):
        assert scenario.token_runs(results[name], token) == placeholder_runs(video_family, keep, video=True), name
        assert [len(k) for k in results[name]["kept"]] == [keep] * SLICES, name
    assert results["video_no_text"]["kept"] == results["video_beta_0"]["kept"]


def test_video_slices_keep_their_markers_and_positions(video_family):
    """Against the unpruned request: the prompts align marker for marker (timestamps, frame starts and ends) and the
    kept tokens, extras included, have their unpruned M-RoPE positions; generation continues after the full video."""
    results = video_family.results
    ours, full = results["video"], results["video_full"]
    placeholders = {video_token(video_family), video_family.case.token}
    length, full_length = len(ours["prompt_ids"]), len(full["prompt_ids"])
    assert length < full_length
    markers = [t for t in ours["prompt_ids"] if t not in placeholders]
    assert markers == [t for t in full["prompt_ids"] if t not in placeholders]
    prefill = ours["positions"][0]
    assert [row[:length] for row in prefill] == expected_positions(ours, full, placeholders, ours["kept"])
    assert [row[0] for row in ours["positions"][1]] == [full["positions"][0][r][full_length - 1] + 1
                                                        for r in range(3)]


# -- the same tokens as apply_hiprune ------------------------------------------------------------------------------
def apply_hiprune_kept(served, kind):
    """apply_hiprune(ratio, prompt_beta=BETA, the tokenizer's special ids) on the same checkpoint, run in
    transformers on the unpruned prompt vLLM built for the image (video) of the "full" ("video_full") request, which
    asks the same question as "default" ("video"), with the pixels of the Hugging Face processor: the kept indices
    per image (video slice)."""
    import transformers
    from transformers.video_utils import VideoMetadata

    import hiprune_ops
    from hiprune_ops import integrations

    family = tiny_families.FAMILIES[served.name]
    processor = transformers.AutoProcessor.from_pretrained(served.model_dir)
    if kind == "image":
        pixels = processor.image_processor(images=[scenario.image(0, family.image_size)], return_tensors="pt")
        prompt_ids = served.results["full"]["prompt_ids"]
    else:  # as vLLM's processor calls it: frames already sampled, their metadata
        frames, metadata = tiny_families.video(100, FRAMES, family.image_size)
        metadata = VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})
        pixels = processor.video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                                           return_tensors="pt")
        prompt_ids = served.results["video_full"]["prompt_ids"]
    model = getattr(transformers, family.architecture).from_pretrained(served.model_dir, dtype=torch.float32).eval()
    hiprune_ops.apply_hiprune(model, ratio=served.case.default["ratio"], prompt_beta=BETA,
                              prompt_special_ids=processor.tokenizer.all_special_ids)
    ids = torch.tensor([prompt_ids])
    inputs = {k: v for k, v in pixels.items() if k != "video_metadata"}
    if served.name.startswith("glm"):  # which of its image placeholders are video frames: the processor's types
        inputs["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids([prompt_ids]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
    state = integrations.hiprune_state(model)
    return [index.tolist() for index in (state.last if kind == "image" else state.last_video).indices]


# Not Qwen3-VL's videos: on the same pixels vLLM's tower output for a video differs from transformers' (by 0.036 at
# most on the tiny model; its images keep the same tokens here), so HiPrune alone already keeps other tokens there.
# GLM's videos: the prompt holds a timestamp after every frame (text in its copy), the prompt text the question after.
@pytest.mark.parametrize("name,kind", [("qwen3_vl", "image"), ("glm4v", "image"), ("qwen2_vl", "video"),
                                       ("glm4v", "video")])
def test_the_same_tokens_as_apply_hiprune(engines, name, kind):
    served = engines[name]
    ours = served.results["default" if kind == "image" else "video"]["kept"]
    assert apply_hiprune_kept(served, kind) == ours


# -- the covered list and the refusal --------------------------------------------------------------------------------
def test_the_covered_list_follows_the_bindings_flags(monkeypatch):
    """prompt_aware_architectures reads the bound classes' flags: a binding turning its flag on is listed."""
    pytest.importorskip("vllm")
    from hiprune_ops.integrations.vllm import _common
    from hiprune_ops.integrations.vllm.gemma3 import HiPruneGemma3ForConditionalGeneration

    _common.prompt_aware_architectures.cache_clear()
    covered = _common.prompt_aware_architectures()
    for architecture in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                         "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                         "Qwen3VLMoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
                         "Qwen3_5MoeForConditionalGeneration", "Glm4vForConditionalGeneration",
                         "Glm4vMoeForConditionalGeneration"):
        assert architecture in covered
    flag = not HiPruneGemma3ForConditionalGeneration.prompt_aware
    monkeypatch.setattr(HiPruneGemma3ForConditionalGeneration, "prompt_aware", flag)
    _common.prompt_aware_architectures.cache_clear()
    assert ("Gemma3ForConditionalGeneration" in _common.prompt_aware_architectures()) == flag
    _common.prompt_aware_architectures.cache_clear()
