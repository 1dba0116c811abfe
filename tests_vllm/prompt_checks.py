"""What the HiPrune++ (prompt_beta) tier-2 files (test_vllm_prompt*.py) share: the requests each prompt-aware
family's engine answers, its engines (shared_engines), and the checks, recomputed outside the plugin in float64.

A family's result, as the checks take it: (arch, model dir, placeholder id, kept count, results by request name, the
baseline's result). The baseline is the same family's engine without prompt_beta, answering the default request.
"""

from __future__ import annotations

import glob
import json
import os

import torch

import scenario

BETA = 0.5
ENGINE = {"enable_prefix_caching": True, "mm_processor_cache_gb": 1}
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


BASELINE = ", baseline without prompt_beta"


def _requests(arch: str, full: dict, extra_requests) -> dict:
    return {**REQUESTS, "full": {"mm_processor_kwargs": full}, **(extra_requests or {}).get(arch, {})}


def shared_engines(prefix: str, families: dict, engine: dict = None, extra_requests: dict = None) -> dict:
    """SHARED_ENGINES (conftest.shared_runs): per family, its engine with prompt_beta (named prefix + arch) answering
    REQUESTS, and its baseline without prompt_beta (named that + BASELINE) answering the default request.

    families: arch -> (the server default budget / ratio, the request's mm_processor_kwargs that keep every token);
    engine: per arch, engine arguments besides ENGINE; extra_requests: per arch, requests by name after REQUESTS'."""
    engines = {}
    for arch, (default, full) in families.items():
        engine_args = {**ENGINE, **(engine or {}).get(arch, {})}
        engines[f"{prefix} {arch}"] = scenario.Engine(arch, {
            "hf_overrides": {"hiprune": {**default, "prompt_beta": BETA}}, "engine": engine_args,
            "requests": list(_requests(arch, full, extra_requests).values())})
        engines[f"{prefix} {arch}{BASELINE}"] = scenario.Engine(arch, {
            "hf_overrides": {"hiprune": default}, "engine": engine_args, "requests": [{}]})
    return engines


def shared_results(prefix: str, families: dict, shared_runs, extra_requests: dict = None) -> dict:
    """arch -> (model dir, results by request name, the baseline's result) of shared_engines' engines."""
    return {arch: (shared_runs.model_dir(f"{prefix} {arch}"),
                   dict(zip(_requests(arch, full, extra_requests), shared_runs[f"{prefix} {arch}"])),
                   shared_runs[f"{prefix} {arch}{BASELINE}"][0]) for arch, (_, full) in families.items()}


def extra_count(keep, beta):
    return int(torch.tensor(beta * keep, dtype=torch.float64).round().item())  # round half to even


def prompt_ids_of(model_dir) -> tuple[set, set]:
    """(special, end-of-turn) ids as integrations/prompt.py takes them: special, the tokenizer's special ids and the
    token ids config.json and generation_config.json name (their text configs too); end-of-turn, their eos ids."""
    import transformers

    special, ends = set(transformers.AutoTokenizer.from_pretrained(model_dir).all_special_ids), set()
    for file in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, file)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            config = json.load(f)
        for section in (config, config.get("text_config") or {}):
            for key, value in section.items():
                if key.endswith(("token_id", "token_ids", "token_index")):
                    ids = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
                    special.update(ids)
                    if key == "eos_token_id":
                        ends.update(ids)
    return special, ends


def embedding_table(model_dir, dtype=torch.float32):
    """The language model's input embedding table in float64, rounded first to the engine's dtype (`dtype`)."""
    from safetensors import safe_open

    path = glob.glob(os.path.join(model_dir, "*.safetensors"))[0]
    with safe_open(path, "pt") as f:
        table = f.get_tensor(next(k for k in f.keys() if k.endswith("embed_tokens.weight")))
    return table.to(dtype).double()


def prompt_embedding(model_dir, prompt_ids, token, special=(), dtype=torch.float32):
    """float64 mean of the language model's embedding rows (embedding_table) over the prompt's text, and those text
    ids: the ids after the last `token` (the image placeholder), from the first ordinary token to the next special
    one, or to the first end-of-turn one (prompt_ids_of; `special`: more ids that are not text)."""
    special_ids, ends = prompt_ids_of(model_dir)
    special_ids |= set(special)
    text = []
    for t in prompt_ids[max(i for i, t in enumerate(prompt_ids) if t == token) + 1:]:
        if t in ends:
            break
        if t in special_ids:
            if text:
                break
            continue
        text.append(t)
    return embedding_table(model_dir, dtype)[text].mean(0), text


def expected_extras(full_embeddings, kept, prompt, count):
    """The `count` not-kept tokens of highest cosine similarity to the prompt (ties: lower index), float64."""
    features = torch.as_tensor(full_embeddings, dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(features, prompt[None], dim=1)
    left = [i for i in range(features.shape[0]) if i not in set(kept)]
    return sorted(sorted(left, key=lambda i: (-cosine[i].item(), i))[:count])


def check_extras(family_result, name, beta, image_rows=None, special=()):
    """Request `name` of a family: its prompt holds kept + extra placeholders, the extras are the not-kept tokens
    most similar to its prompt, and the language model received exactly those tokens of the unpruned image (the
    "full" request's). image_rows(result) -> the received embeddings of the image's tokens (default: all of them);
    special: markers after the image that are not text, besides prompt_ids_of's. Returns the kept indices."""
    arch, model_dir, token, keep, results, _ = family_result
    result, hiprune = results[name], results["beta_0"]["kept"][0]
    kept = result["kept"][0]
    count = extra_count(keep, beta)
    assert len(kept) == keep + count == scenario.token_runs(result, token)[0]
    assert set(hiprune) <= set(kept) and kept == sorted(kept)
    prompt, text = prompt_embedding(model_dir, result["prompt_ids"], token, special)
    assert text, "the prompt has text"
    extras = sorted(set(kept) - set(hiprune))
    assert extras == expected_extras(results["full"]["embeddings"][0], hiprune, prompt, count)
    # The language model received exactly those tokens of the unpruned image, in raster order.
    full = torch.tensor(results["full"]["embeddings"][0])
    received = image_rows(result) if image_rows is not None else result["embeddings"][0]
    assert torch.allclose(torch.tensor(received), full[kept], atol=1e-5, rtol=1e-5)
    return kept


def check_video_extras(model_dir, token, results, name, keep, beta, newline=False):
    """A video request `name` pruned frame by frame (Gemma 4, LLaVA-OneVision): every frame keeps HiPrune's `keep`
    tokens (the "video_beta_0" request's) plus the extra_count(keep, beta) not-kept ones most similar to the prompt,
    recomputed from the frame's rows of the unpruned video ("video_full": frame after frame, then, with `newline`,
    OneVision's newline row); the language model received exactly those rows, and the prompt holds that many
    placeholders: per frame (Gemma 4's run per frame), or with `newline` the video's one run, the newline's
    placeholder last. Returns the kept indices per frame."""
    result, hiprune = results[name], results["video_beta_0"]["kept"]
    full = torch.tensor(results["video_full"]["embeddings"][0])
    frames, count = len(hiprune), extra_count(keep, beta)
    per_frame = (full.shape[0] - newline) // frames
    assert count > 0 and frames > 1 and len(result["kept"]) == frames
    runs = [frames * (keep + count) + 1] if newline else [keep + count] * frames
    assert scenario.token_runs(result, token) == runs
    prompt, text = prompt_embedding(model_dir, result["prompt_ids"], token)
    assert text, "the prompt has text"
    rows = []
    for frame, (kept, base) in enumerate(zip(result["kept"], hiprune)):
        assert len(base) == keep and len(kept) == keep + count and kept == sorted(set(kept)), frame
        assert set(base) <= set(kept), frame
        start = frame * per_frame
        extras = sorted(set(kept) - set(base))
        assert extras == expected_extras(full[start:start + per_frame], base, prompt, count), frame
        rows += [start + i for i in kept]
    rows += [full.shape[0] - 1] if newline else []
    assert torch.allclose(torch.tensor(result["embeddings"][0]), full[rows], atol=1e-5, rtol=1e-5)
    return result["kept"]


def check_two_questions(family_result, **options):
    """Prefix caching and the processor cache on: the second question's tokens are its own, not the cached first's;
    the same question again gives the same prompt, tokens and output."""
    results = family_result[4]
    first = check_extras(family_result, "default", BETA, **options)
    second = check_extras(family_result, "question", BETA, **options)
    check_questions_cached_apart(results, first, second)


def check_questions_cached_apart(results, first, second):
    """Results by request name: "default" and "question" (two questions on one image, kept indices `first` and
    `second`) differ, and "again" / "question_again" repeat them, answered from the caches (no encoder run)."""
    assert first != second  # these two questions pick different tokens on this image (else the test shows nothing)
    for name, twin in (("again", "default"), ("question_again", "question")):
        for key in ("prompt_ids", "tokens"):
            assert results[name][key] == results[twin][key], (name, key)
        # The caches are on: the repeated prompt ran no encoder (its image came from the prefix / encoder cache).
        assert results[name]["kept"] == [] and results[name]["embeddings"] == [], name


# Tests every prompt-aware family passes as it is: a test file imports them (pytest collects them there, on the
# file's `family` fixture: a family's result).
def test_beta_0_is_hiprune(family):
    _, _, _, keep, results, baseline = family
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
