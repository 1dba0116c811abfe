"""HiPrune++ (prompt_beta) in apply_hiprune and encode, and `hiprune demo --prompt`, on tiny random models.

Every check recomputes the added tokens independently: the prompt's text found by a plain loop over the ids, its
mean embedding and every cosine in float64 from the unpatched model's own features, the top t not-kept tokens.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import hiprune_ops  # noqa: E402
from hiprune_ops import integrations  # noqa: E402
from hiprune_ops.integrations import prompt  # noqa: E402
from hf_testing import TEXT, left_pad, spied_forward, unpatch  # noqa: E402
from test_hf_pooled_grid import (BREAK, IMAGE_END, INPUTS, START, END, _all_features,  # noqa: E402, F401
                                 gemma3, internvl, mistral3)
from test_hf_pooled_grid import IMAGE as GRID_IMAGE  # noqa: E402
from test_hf_qwen_vl import END, IMG, PATCH_DIM, START, VID, _model, make_inputs  # noqa: E402
from test_integrations import IMAGE, N, _clip, llava, llava_next, next_inputs  # noqa: E402, F401
from test_hf_gemma4_onevision import VIDEO, _gemma4_all_features, gemma4, gemma4_inputs  # noqa: E402, F401
from test_hf_gemma4_onevision import IMAGE as GEMMA4_IMAGE  # noqa: E402

BETA = 0.25


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    unpatch(*(request.getfixturevalue(n) for n in ("llava", "llava_next", "internvl", "gemma3", "mistral3", "gemma4")
              if n in request.fixturenames))


def expected_texts(input_ids, mask, placeholders, special, ends=(TEXT["eos_token_id"],)):
    """Per row, the prompt text's token ids by the documented rule, found by a plain loop."""
    texts = []
    for ids, attended in zip(input_ids.tolist(), mask.tolist()):
        visual = [i for i, t in enumerate(ids) if t in placeholders]
        text = []
        for token, on in zip(ids[visual[-1] + 1:] if visual else [], attended[visual[-1] + 1:] if visual else []):
            if token in ends:
                break
            if not on or token in special:
                if text:
                    break
                continue
            text.append(token)
        texts.append(text)
    return texts


def item_rows(input_ids, placeholders, full_counts):
    """The row of each item: items own the next full_counts[i] placeholders, row after row."""
    per_row = [sum(t in placeholders for t in row) for row in input_ids.tolist()]
    rows, row, used = [], 0, 0
    for count in full_counts:
        while used >= per_row[row]:
            row, used = row + 1, 0
        rows.append(row)
        used += count
    return rows


def expected_indices(base, features, text_embedding, beta):
    """base (kept,) HiPrune indices -> kept + the top round(beta * kept) not-kept tokens by float64 cosine."""
    if text_embedding is None:
        return base
    t = min(round(beta * base.numel()), features.shape[0] - base.numel())
    f = features.double()
    cos = ((f @ text_embedding) / (f.norm(dim=1) * text_embedding.norm())).tolist()
    left = [i for i in range(f.shape[0]) if i not in set(base.tolist())]
    order = sorted(left, key=lambda i: (cos[i] != cos[i], -cos[i] if cos[i] == cos[i] else 0, i))[:t]  # NaN last
    return torch.cat([base, torch.tensor(order, dtype=base.dtype)]).sort().values


def assert_prompt_tokens(model, inputs, budget, features, placeholders, special, kind="image", visual=None,
                         **options):
    """apply_hiprune(budget) vs apply_hiprune(budget, prompt_beta=BETA): the second keeps HiPrune's tokens plus the
    independently computed prompt matches, and the language model gets exactly those rows. features: per item,
    every token (n, D) as the language model receives it; placeholders: the ids of the items' kind; visual: every
    visual placeholder id (default: placeholders). Returns the per-item added indices."""
    attr = "last" if kind == "image" else "last_video"
    hiprune_ops.apply_hiprune(model, budget=budget, **({"video_budget": budget} if kind == "video" else {}))
    with torch.no_grad():
        model(**inputs)
    base = getattr(integrations.hiprune_state(model), attr)
    hiprune_ops.remove_hiprune(model)
    hiprune_ops.apply_hiprune(model, budget=budget, prompt_beta=BETA, **options,
                              **({"video_budget": budget} if kind == "video" else {}))
    _, (spy,) = spied_forward(model, inputs, model.model)  # the shrunk prompt
    state = getattr(integrations.hiprune_state(model), attr)
    table = model.get_input_embeddings().weight.double()
    texts = expected_texts(inputs["input_ids"], inputs["attention_mask"], visual or placeholders, special)
    prompts = [table[text].mean(0) if text else None for text in texts]
    rows = item_rows(inputs["input_ids"], placeholders, state.full_counts)
    added = []
    assert len(state.indices) == len(features) == len(rows)
    for item, (row, kept, role, old, old_role, every) in enumerate(zip(rows, state.indices, state.roles,
                                                                       base.indices, base.roles, features)):
        expected = expected_indices(old, every, prompts[row], BETA)
        assert torch.equal(kept, expected), (item, kept, expected)
        extra = ~torch.isin(kept, old)
        assert torch.equal(role[~extra], old_role) and bool((role[extra] == 3).all())
        assert state.features[item].shape[0] == kept.numel() == budget + int(extra.sum())
        torch.testing.assert_close(state.features[item], every[kept], atol=1e-5, rtol=1e-5)
        added.append(kept[extra])
    # The prefill: each item's placeholder run shrinks to its N' + t tokens, and holds exactly its features.
    removed = [0] * inputs["input_ids"].shape[0]
    for row, full, kept in zip(rows, state.full_counts, state.features):
        removed[row] += full - kept.shape[0]
    call = spy.calls[0]
    assert call["attention_mask"].sum(1).tolist() == [int(m) - r for m, r in
                                                      zip(inputs["attention_mask"].sum(1), removed)]
    return added


def llava_features(model, pixel_values):
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=pixel_values).pooler_output)


LLAVA_SPECIAL = {0, 1, 2, IMAGE}


def test_llava_two_prompts_each_get_their_own_tokens_and_no_text_gets_none(llava):
    # The same image in three left-padded rows: two questions, and one prompt with no text after its image.
    image = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    ids, mask = left_pad([[1, 5] + [IMAGE] * N + [20, 21, 22, 2], [1] + [IMAGE] * N + [40, 41],
                          [1, 7, 8] + [IMAGE] * N + [2]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=image.expand(3, -1, -1, -1).contiguous())
    added = assert_prompt_tokens(llava, inputs, 12, llava_features(llava, inputs["pixel_values"]), {IMAGE},
                                 LLAVA_SPECIAL)
    assert [a.numel() for a in added] == [3, 3, 0]  # round(0.25 * 12); the prompt without text adds nothing
    assert not torch.equal(added[0], added[1])  # the same image, two questions: two sets of tokens


def test_llava_several_images_per_row_and_beta_0_is_hiprune(llava):
    g = torch.Generator().manual_seed(6)
    ids, mask = left_pad([[1, 5] + [IMAGE] * N + [6, 7] + [IMAGE] * N + [8, 9, 10], [1, 11] + [IMAGE] * N + [12]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 56, 56, generator=g))
    assert_prompt_tokens(llava, inputs, 20, llava_features(llava, inputs["pixel_values"]), {IMAGE}, LLAVA_SPECIAL)
    hiprune_ops.remove_hiprune(llava)
    outputs = []
    for options in ({}, {"prompt_beta": 0.0}, {"prompt_beta": 0}):
        hiprune_ops.apply_hiprune(llava, budget=20, **options)
        with torch.no_grad():
            outputs.append(llava(**inputs).logits)
        assert [i.numel() for i in integrations.hiprune_state(llava).last.indices] == [20] * 3
        hiprune_ops.remove_hiprune(llava)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def _qwen_features(model, inputs, kind):
    pixels, grid = (inputs["pixel_values"], inputs["image_grid_thw"]) if kind == "image" else (
        inputs["pixel_values_videos"], inputs["video_grid_thw"])
    with torch.no_grad():
        per_item = getattr(model.model, f"get_{kind}_features")(pixels, grid).pooler_output
    slices = [int(t) for t in grid[:, 0]]
    return [s for item, t in zip(per_item, slices) for s in item.chunk(t)]  # one item per temporal slice


@pytest.mark.parametrize("name,kind", [("qwen2_5_vl", "image"), ("qwen3_vl", "video"), ("glm4v", "video")])
def test_qwen_style_images_and_video_slices(name, kind):
    model = _model(name)
    try:
        inputs, _ = make_inputs(name, kind)
        # make_inputs ends every item with [END, 7]: give row 1 a longer question.
        inputs["input_ids"][1, -1] = 9
        placeholder = IMG if kind == "image" or name.startswith("glm") else VID
        special = prompt.config_token_ids(model.config, model.config.text_config) | {0, 1, 2}
        assert_prompt_tokens(model, inputs, 5, _qwen_features(model, inputs, kind), {placeholder}, special,
                             kind=kind)
    finally:
        unpatch(model)


GLM_VIDEO_START, GLM_VIDEO_END = 154, 155  # test_hf_qwen_vl's tiny GLM configs
GLM_QUESTIONS = [[40, 41, 42], [60, 61], []]  # the last row: the video, then the end of the turn


def glm_video_inputs(questions=GLM_QUESTIONS, frames=2, side=8):
    """GLM-4V's own video prompt (its processor's layout), one video of `frames` temporal slices per row:
    <|begin_of_video|>, per slice <|begin_of_image|> placeholders <|end_of_image|> and its timestamp (plain text:
    the processor writes the seconds as digits), <|end_of_video|>, then the row's question and eos; left-padded."""
    n = side * side // 4
    rows, types = [], []
    for question in questions:
        video = [GLM_VIDEO_START]
        for s in range(frames):
            video += [START] + [IMG] * n + [END, 20 + s]  # 20, 21: the timestamps
        video.append(GLM_VIDEO_END)
        rows.append([1, 5] + video + question + [2])
        types.append([2 if t == IMG else 0 for t in rows[-1]])
    ids, mask = left_pad(rows)
    grid = torch.tensor([[frames, side, side]] * len(rows))
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(11))
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=left_pad(types)[0].int(),
                pixel_values_videos=pixels, video_grid_thw=grid)


@pytest.mark.parametrize("name", ["glm4v", "glm46v"])
def test_glm_video_timestamps_are_not_prompt_text(name):
    # GLM writes each frame's timestamp after its placeholders: after the last frame comes a timestamp, then
    # <|end_of_video|>, then the question. The prompt text is the question; a row with none has no text.
    model = _model(name)
    inputs = glm_video_inputs()
    try:
        hiprune_ops.apply_hiprune(model, budget=5, video_budget=5, prompt_beta=BETA)
        embeddings = integrations.hiprune_state(model).prompt_embeddings(inputs)
    finally:
        unpatch(model)
    table = model.get_input_embeddings().weight.detach()
    for row, (question, embedding) in enumerate(zip(GLM_QUESTIONS, embeddings)):
        if not question:
            assert embedding is None, row
            continue
        torch.testing.assert_close(embedding, table[question].float().mean(0), atol=0, rtol=0)
    # The pipeline: every slice adds the tokens nearest its row's question, none for the row without one.
    special = prompt.config_token_ids(model.config, model.config.text_config) | {0, 1, 2}
    try:
        added = assert_prompt_tokens(model, inputs, 5, _qwen_features(model, inputs, "video"), {IMG}, special,
                                     kind="video", visual={IMG, GLM_VIDEO_END})
    finally:
        unpatch(model)
    assert [a.numel() for a in added] == [1, 1, 1, 1, 0, 0]  # round(0.25 * 5) per slice; two slices per row


@pytest.mark.parametrize("name,markers", [("internvl", [START, END]), ("gemma3", []),
                                          ("mistral3", [BREAK, IMAGE_END])])
def test_pooled_grid_families(request, name, markers):
    # markers: what a tokenizer's all_special_ids would add to the tiny configs' own token ids.
    model = request.getfixturevalue(name)
    inputs = INPUTS[name]()
    special = prompt.config_token_ids(model.config, model.config.text_config) | {0, 1, 2, *markers}
    features = _all_features(name, model, inputs)
    assert_prompt_tokens(model, inputs, 4, list(features), {GRID_IMAGE}, special, prompt_special_ids=markers)


def test_gemma4_images_of_their_own_sizes_before_a_video(gemma4):
    inputs = gemma4_inputs()
    images, _ = _gemma4_all_features(gemma4, inputs)
    special = prompt.config_token_ids(gemma4.config, gemma4.config.text_config) | {0, 1, 2}
    added = assert_prompt_tokens(gemma4, inputs, 4, images, {GEMMA4_IMAGE}, special, visual={GEMMA4_IMAGE, VIDEO})
    assert [a.numel() for a in added] == [1, 1, 1]


def test_llava_next_every_tile_gets_its_prompt_tokens(llava_next):
    inputs = next_inputs(llava_next)
    hiprune_ops.apply_hiprune(llava_next, budget=20, prompt_beta=0.5)
    _, (outer,) = spied_forward(llava_next, inputs, llava_next.model)
    state = integrations.hiprune_state(llava_next).last
    assert [i.shape[0] for i in state.indices] == [3, 5]  # base + tiles of each image
    for indices, roles, features in zip(state.indices, state.roles, state.features):
        keep = 20 // indices.shape[0]
        extra = min(round(0.5 * keep), 16 - keep)  # 4x4 patches per tile
        assert indices.shape[1] == keep + extra and features.shape[0] == indices.numel()
        assert ((roles == 3).sum(1) == extra).all() and bool((indices.diff(dim=1) > 0).all())
    assert (outer.calls[0]["input_ids"] == IMAGE).sum(1).tolist() == [f.shape[0] for f in state.features]


def test_prompt_text_rule_on_a_chat_template():
    # <s> user: <img><IMG>x3</img> what is this <eot> assistant: -- 10 pad, 1 bos, 3 eot, 4/5 image markers.
    ids = torch.tensor([[10, 1, 30, 4, 9, 9, 9, 5, 31, 32, 33, 3, 40, 41],
                        [10, 10, 1, 30, 4, 9, 9, 9, 5, 3, 40, 41, 42, 43],    # no text after the image
                        [1, 30, 50, 51, 52, 53, 3, 40, 41, 42, 43, 44, 45, 46]])  # no image
    mask = (ids != 10).long()
    text = prompt.text_mask(ids, ids == 9, {1, 4, 5, 10}, mask, end_ids={3})
    assert text[0].nonzero().flatten().tolist() == [8, 9, 10]
    assert not text[1].any() and not text[2].any()
    assert prompt.item_rows(ids == 9, [0, 3]) == [0, 1]
    with pytest.raises(ValueError, match="placeholder"):
        prompt.item_rows(ids == 9, [6])


@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                         ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_prompt_beta_names_itself(llava, value, error):
    with pytest.raises(error, match="prompt_beta"):
        hiprune_ops.apply_hiprune(llava, budget=8, prompt_beta=value)
    assert integrations.hiprune_state(llava) is None
    tower = transformers.CLIPVisionModel(_clip()).eval()
    with pytest.raises(error, match="prompt_beta"):
        hiprune_ops.encode(tower, torch.zeros(1, 3, 56, 56), 8, prompt_embedding=torch.ones(32), prompt_beta=value)


def test_encode_with_a_prompt_embedding():
    torch.manual_seed(1)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        every = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        base = hiprune_ops.encode(tower, pixels, 10)
        prompts = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
        shared = hiprune_ops.encode(tower, pixels, 10, prompt_embedding=prompts[0], prompt_beta=0.3)
        own = hiprune_ops.encode(tower, pixels, 10, prompt_embedding=prompts, prompt_beta=0.3)
        projection = torch.nn.Linear(32, 16)
        projected = hiprune_ops.encode(tower, pixels, 10, prompt_embedding=prompts[:, :16], prompt_beta=0.3,
                                       prompt_projection=projection)
    for image in range(2):
        cases = ((shared, every[image], prompts[0]), (own, every[image], prompts[image]),
                 (projected, projection(every[image]).detach(), prompts[image, :16]))
        for out, features, text in cases:
            expected = expected_indices(base.indices[image], features, text.double(), 0.3)
            assert torch.equal(out.indices[image], expected) and expected.numel() == 13  # 10 + round(3.0)
            assert torch.equal(out.features[image], every[image][expected])
            assert int((out.roles[image] == 3).sum()) == 3
    with pytest.raises(ValueError, match="prompt_embedding has 3 rows for 2 images"):
        hiprune_ops.encode(tower, pixels, 10, prompt_embedding=torch.randn(3, 32))
    with pytest.raises(ValueError, match="prompt_projection needs a prompt_embedding"):
        hiprune_ops.encode(tower, pixels, 10, prompt_projection=projection)


def test_demo_prompt_draws_the_prompt_tokens_in_their_own_colour(tmp_path, capsys):
    pytest.importorskip("skimage")
    from PIL import Image

    from hiprune_ops import cli

    out = tmp_path / "prompt.png"
    assert cli.main(["demo", "--size", "tiny", "--rounds", "1", "--budget", "100", "--prompt", "the flag",
                     "--prompt-beta", "0.2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prompt    20" in text and "total     120" in text  # round(0.2 * 100) on top of the budget
    assert "random-weight CLIP text tower" in text and "green: prompt matches" in text
    with Image.open(out) as image:
        green = sum(count for count, colour in image.convert("RGB").getcolors(1 << 24)
                    if colour == cli.ROLE_COLOURS[3])
    assert green > 13 * 13  # outlines of the 20 tokens, besides the legend's square
