"""Tier 2: HiPrune++ (prompt_beta) in the vLLM plugin, Gemma 4 and Mistral 3 (tiny random models, vLLM CPU).

One engine per family with the server default prompt_beta and many requests on one image (seed 0), and its baseline
without prompt_beta, in the session's shared processes (prompt_checks.shared_engines): the prompt holds N' + t
placeholders (Gemma 4: between <start_of_image> and <end_of_image>; Mistral 3: [IMG] tokens, then the row markers);
the t extra tokens are the not-kept soft / merged tokens most similar to the prompt, recomputed in float64 from the
embeddings the language model received (the same image unpruned) and the embedding table; the same image under two
questions never shares a cached encoder output; prompt_beta 0 is HiPrune; no text, no extra tokens; a bad value
fails its request only. Against apply_hiprune on the transformers model of the same checkpoint, on the same prompt
ids (a chat prompt among them): the same prompt text ids and the same kept tokens. Gemma 4 videos, on the same
engine: every frame holds its kept + extra tokens, the extras recomputed as for an image from the unpruned video
(hiprune_video_ratio 1.0), and another question's on the same video its own; no text, no extra tokens; with and
without prompt_beta the kept tokens of apply_hiprune on the same frames and prompt.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import prompt_checks  # noqa: E402
import scenario  # noqa: E402
import serving  # noqa: E402
import tiny_families  # noqa: E402
from prompt_checks import BETA, check_extras, check_video_extras  # noqa: E402
# Collected here, on this file's families.
from prompt_checks import (test_bad_request_beta_fails_that_request_only, test_beta_0_is_hiprune,  # noqa: E402, F401
                           test_no_text_no_extra_tokens)

RATIO = 0.25
SOFT_TOKEN = tiny_families.GEMMA4_SPECIAL["<image_soft_token>"]
VIDEO_TOKEN = tiny_families.GEMMA4_SPECIAL["<|video|>"]
IMG, BREAK, END = (tiny_families.PIXTRAL_SPECIAL[t] for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
MISTRAL3_GRID = (4, 6)  # merged rows, columns of the 112 x 168 image
# Per family: its placeholder id, the server default ratio, the tokens kept per image, the request that keeps every
# token, the image's unpruned token count.
FAMILIES = {
    "gemma4": (SOFT_TOKEN, {"ratio": RATIO}, scenario.kept(RATIO, 64), {"hiprune_ratio": 1.0}, 64),
    "mistral3": (IMG, {"ratio": RATIO}, scenario.kept(RATIO, 24), {"hiprune_ratio": 1.0}, 24),
}
# A chat in Gemma's shape on the tiny vocabulary: bos, the user turn (the family's image placeholder, the question),
# end of turn, the model turn. The template writes the placeholder, as released templates do (vLLM has no
# placeholder text for Mistral 3).
CHAT_TEMPLATE = "<s> {%% for message in messages %%}{{ message['role'] }} :{%% for part in message['content'] %%} " \
                "{%% if part['type'] == 'text' %%}{{ part['text'] }}{%% else %%}%s{%% endif %%}{%% endfor %%} </s> " \
                "{%% endfor %%}assistant :"
PLACEHOLDERS = {"gemma4": "<image_soft_token>", "mistral3": "[IMG]"}
# Words of its own: the same text ids as another request on the same image would share its cached encoder output.
CHAT_QUESTION = "what is in the picture"
FRAMES = 4
VIDEO = {"videos": [[FRAMES, 224, 224]]}
VIDEO_REQUESTS = {  # Gemma 4's engine: a video of 4 frames of 64 soft tokens, kept per frame as an image
    "video": dict(VIDEO),                                                               # the prompt's question
    "video_question": dict(VIDEO, question=prompt_checks.QUESTION),                     # the same video, another
    "video_beta_0": dict(VIDEO, mm_processor_kwargs={"hiprune_prompt_beta": 0}),       # HiPrune
    "video_full": dict(VIDEO, mm_processor_kwargs={"hiprune_video_ratio": 1.0}),       # every token: the reference
    "video_no_text": dict(VIDEO, question=""),                                          # no text after the video
}


def chat(arch):
    url = serving.image_data_url(0, tiny_families.FAMILIES[arch].image_size)  # scenario.image(0, size)'s pixels
    return {"messages": serving.messages(url, CHAT_QUESTION), "chat_template": CHAT_TEMPLATE % PLACEHOLDERS[arch]}


DEFAULTS = {arch: (default, full) for arch, (_, default, _, full, _) in FAMILIES.items()}
EXTRA_REQUESTS = {"gemma4": {"chat": chat("gemma4"), **VIDEO_REQUESTS}, "mistral3": {"chat": chat("mistral3")}}
SHARED_ENGINES = prompt_checks.shared_engines(  # conftest.shared_runs
    "prompt", DEFAULTS, engine={"gemma4": {"limit_mm_per_prompt": {"image": 1, "video": 1}, "max_model_len": 1024}},
    extra_requests=EXTRA_REQUESTS)


@pytest.fixture(scope="module")
def engines(shared_runs):
    """arch -> (model dir, results by request name, the baseline's result)."""
    return prompt_checks.shared_results("prompt", DEFAULTS, shared_runs, EXTRA_REQUESTS)


@pytest.fixture(params=list(FAMILIES))
def family(request, engines):
    arch = request.param
    token, _, keep, _, _ = FAMILIES[arch]
    model_dir, results, baseline = engines[arch]
    return arch, model_dir, token, keep, results, baseline


def mistral3_image_rows(result):
    """The received embeddings of a Mistral 3 image's [IMG] tokens: row by row its kept tokens, the row's marker
    (the embedding after them) left out."""
    (indices,), (embedding,) = result["kept"], result["embeddings"]
    rows, columns = MISTRAL3_GRID
    out, at = [], 0
    for row in range(rows):
        count = sum(1 for i in indices if i // columns == row)
        out += embedding[at:at + count]
        at += count + 1
    assert at == len(embedding)
    return out


# Per family, check_extras' options. Mistral 3: the row markers follow the image's last [IMG] in the prompt; the
# tiny tokenizer does not list them among its special ids (released ones mark them special), so they are named.
CHECKS = {"gemma4": {}, "mistral3": {"image_rows": mistral3_image_rows, "special": (BREAK, END)}}


def test_prompt_holds_kept_plus_extra_tokens_most_similar_to_the_prompt(family):
    check_extras(family, "default", BETA, **CHECKS[family[0]])


def test_per_request_beta(family):
    check_extras(family, "beta_1", 1.0, **CHECKS[family[0]])


def test_the_chat_prompts_question_picks_the_extra_tokens(family):
    check_extras(family, "chat", BETA, **CHECKS[family[0]])


def test_two_questions_on_one_image_each_get_their_own_tokens(family):
    prompt_checks.check_two_questions(family, **CHECKS[family[0]])


def test_mistral3_keeps_every_row_marker_after_the_kept_and_extra_tokens(engines):
    _, results, _ = engines["mistral3"]
    rows, _ = MISTRAL3_GRID
    for name in ("default", "beta_1", "chat"):
        ids = results[name]["prompt_ids"]
        start = ids.index(IMG)
        count = len(results[name]["kept"][0])
        assert ids[start:start + count + rows] == [IMG] * count + [BREAK] * (rows - 1) + [END], name


def unpruned_prompt(arch, prompt_ids, token, count):
    """A vLLM prompt's ids with its image's run as the unpruned model's processor writes it (count tokens)."""
    start = prompt_ids.index(token)
    if arch == "mistral3":
        rows, columns = MISTRAL3_GRID
        end = prompt_ids.index(END, start) + 1
        run = ([IMG] * columns + [BREAK]) * (rows - 1) + [IMG] * columns + [END]
    else:
        end = start + prompt_ids.count(token)
        run = [token] * count
    return prompt_ids[:start] + run + prompt_ids[end:]


def test_the_same_text_and_tokens_as_apply_hiprune(family):
    """The transformers model of the same checkpoint, apply_hiprune at the same ratio and prompt_beta (the
    tokenizer's special ids passed, as vLLM reads them, and Mistral 3's row markers), the same image, on each
    request's prompt unpruned: the same prompt text ids (vLLM's from its prompt, apply_hiprune's from the expanded
    one) and the same kept tokens."""
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations
    from hiprune_ops.integrations import prompt

    arch, model_dir, token, _, results, _ = family
    model_class = {"gemma4": transformers.Gemma4ForConditionalGeneration,
                   "mistral3": transformers.Mistral3ForConditionalGeneration}[arch]
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    special = [*processor.tokenizer.all_special_ids, *CHECKS[arch].get("special", ())]
    hiprune_ops.apply_hiprune(model, ratio=RATIO, prompt_beta=BETA, prompt_special_ids=special)
    state = integrations.hiprune_state(model)
    pixels = dict(processor.image_processor([scenario.image(0, tiny_families.FAMILIES[arch].image_size)],
                                            return_tensors="pt"))
    pixels.pop("num_soft_tokens_per_image", None)
    question = processor.tokenizer.encode(CHAT_QUESTION, add_special_tokens=False)
    for name in ("default", "question", "chat", "no_text"):
        result = results[name]
        ids = torch.tensor([unpruned_prompt(arch, result["prompt_ids"], token, FAMILIES[arch][4])])
        text = ids[prompt.text_mask(ids, ids == token, state.special_ids, None, state.end_ids)].tolist()
        assert result["prompt_text_ids"] == [text], name
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
        assert [i.tolist() for i in state.last.indices] == result["kept"], name
    assert results["chat"]["prompt_text_ids"] == [question]  # the user turn's question, not the model turn
    assert results["no_text"]["prompt_text_ids"] == [[]]


# -- Gemma 4 videos: every frame gets its own extra tokens -----------------------------------------------------------
def test_gemma4_video_frames_hold_kept_plus_extra_tokens_most_similar_to_the_prompt(engines):
    model_dir, results, _ = engines["gemma4"]
    check_video_extras(model_dir, VIDEO_TOKEN, results, "video", FAMILIES["gemma4"][2], BETA)


def test_two_questions_on_one_gemma4_video_each_get_their_own_tokens(engines):
    """Prefix caching and the processor cache on: the second question on the same video gets its own tokens."""
    model_dir, results, _ = engines["gemma4"]
    keep = FAMILIES["gemma4"][2]
    first, second = (check_video_extras(model_dir, VIDEO_TOKEN, results, name, keep, BETA)
                     for name in ("video", "video_question"))
    assert first != second


def test_gemma4_video_without_text_gets_no_extra_tokens(engines):
    _, results, _ = engines["gemma4"]
    keep = FAMILIES["gemma4"][2]
    for name in ("video_no_text", "video_beta_0"):
        assert scenario.token_runs(results[name], VIDEO_TOKEN) == [keep] * FRAMES, name
        assert [len(kept) for kept in results[name]["kept"]] == [keep] * FRAMES, name
    assert results["video_no_text"]["kept"] == results["video_beta_0"]["kept"]


@pytest.mark.parametrize("name,beta", [("video", BETA), ("video_beta_0", 0.0)])
def test_gemma4_video_the_same_tokens_as_apply_hiprune(engines, name, beta):
    """apply_hiprune at the same ratio and `beta` on the transformers model of the same checkpoint, on vLLM's
    unpruned prompt of the video ("video_full": the same question), the frames made as vLLM makes them (images of
    at most 70 soft tokens, scenario's seed): the same kept tokens per frame, extras included."""
    Image = pytest.importorskip("PIL.Image")
    transformers = pytest.importorskip("transformers")
    import hiprune_ops
    from hiprune_ops import integrations

    model_dir, results, _ = engines["gemma4"]
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    hiprune_ops.apply_hiprune(model, ratio=RATIO, prompt_beta=beta,
                              prompt_special_ids=processor.tokenizer.all_special_ids)
    array, _ = tiny_families.video(100, FRAMES, VIDEO["videos"][0][1:])
    frames = processor.image_processor([Image.fromarray(frame) for frame in array], max_soft_tokens=70,
                                       return_tensors="pt")
    ids = torch.tensor([results["video_full"]["prompt_ids"]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=frames["pixel_values"],
              video_position_ids=frames["image_position_ids"], num_frames_per_video=torch.tensor([FRAMES]))
    assert [i.tolist() for i in integrations.hiprune_state(model).last_video.indices] == results[name]["kept"]
