"""apply_hiprune on the Qwen-style families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE), GLM-4.1V/4.5V):
images, videos and mixed prompts, on tiny random models built offline from configs. One test body per property,
parametrized over the families."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import hiprune_ops  # noqa: E402
from hiprune_ops import integrations  # noqa: E402
from hiprune_ops.integrations import capture  # noqa: E402
from hiprune_ops.integrations.hf import FAMILIES  # noqa: E402
from hf_testing import (TEXT, assert_full_budget_is_identity,  # noqa: E402
                        assert_remove_restores_bit_identical_outputs, left_pad, spied_forward, spying, unpatch)

IMG, VID, START, END = 151, 152, 150, 153
PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal_patch_size * patch_size ** 2
_ROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}
_VISION = dict(depth=4, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)


def _qwen2_vl():
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        vision_config=dict(_VISION, embed_dim=32, mlp_ratio=2), text_config=dict(TEXT, rope_parameters=_ROPE),
        **_IDS))


def _qwen2_5_vl():
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        vision_config=dict(_VISION, intermediate_size=64, out_hidden_size=32, window_size=16,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(TEXT, rope_parameters=_ROPE), **_IDS))


def _qwen3_vl(moe=False):
    text = dict(TEXT, head_dim=8, rope_parameters=dict(_ROPE, mrope_interleaved=True))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, prefix + "Config")(
        vision_config=dict(_VISION, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=[1, 2]), text_config=text, **_IDS)
    return getattr(transformers, prefix + "ForConditionalGeneration")(config)


def _qwen3_5(moe=False):
    text = dict(TEXT, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
                rope_parameters=dict(_ROPE, mrope_interleaved=True, partial_rotary_factor=1.0))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    config = getattr(transformers, prefix + "Config")(
        vision_config=dict(_VISION, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16),
        text_config=text, **_IDS)
    return getattr(transformers, prefix + "ForConditionalGeneration")(config)


def _glm4v(prefix="Glm4v"):
    text = dict(TEXT, rope_parameters=dict(_ROPE, partial_rotary_factor=1.0))
    vision = dict(_VISION, intermediate_size=64, out_hidden_size=32, image_size=32)
    if prefix == "Glm4vMoe":
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                    first_k_dense_replace=1, head_dim=8)
    if prefix == "Glm46V":  # sub-configs named by type
        text["model_type"], vision["model_type"] = "glm4v_text", "glm4v_vision"
    config = getattr(transformers, prefix + "Config")(
        vision_config=vision, text_config=text,
        image_token_id=IMG, video_token_id=VID, image_start_token_id=START, image_end_token_id=END,
        video_start_token_id=154, video_end_token_id=155)
    return getattr(transformers, prefix + "ForConditionalGeneration")(config)


BUILDERS = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": lambda: _qwen3_vl(moe=True), "qwen3_5": _qwen3_5, "qwen3_5_moe": lambda: _qwen3_5(moe=True),
    "glm4v": _glm4v, "glm4v_moe": lambda: _glm4v("Glm4vMoe"), "glm46v": lambda: _glm4v("Glm46V"),
}
GLM = ("glm4v", "glm4v_moe", "glm46v")  # video placeholders use the image id
PER_FRAME = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe") + GLM  # one placeholder run per video slice
_models = {}


def _model(name):
    if name not in _models:
        torch.manual_seed(list(BUILDERS).index(name))
        _models[name] = BUILDERS[name]().eval()
    return _models[name]


@pytest.fixture(params=list(BUILDERS))
def family(request):
    name = request.param
    model = _model(name)
    yield name, model
    unpatch(model)


# -- prompts: rows of text and visual items ------------------------------------------------------------------------
ROWS = {  # (kind, grid t, h, w in patches); text tokens between them
    "image": [[("image", 1, 8, 8), ("image", 1, 8, 12)], [("image", 1, 12, 8)]],
    "video": [[("video", 2, 8, 8)], [("video", 3, 8, 12)]],
    "mixed": [[("image", 1, 8, 8), ("video", 2, 8, 8)], [("video", 2, 12, 8), ("image", 1, 8, 12)]],
}


def make_inputs(name, content, seed=0, types=True):
    """Left-padded batch; returns (inputs, per-row list of (kind, merged tokens per slice, slices))."""
    g = torch.Generator().manual_seed(seed)
    video_id = IMG if name in GLM else VID
    rows, row_types, layout = [], [], []
    grids = {"image": [], "video": []}
    for spec in ROWS[content]:
        ids, kinds, items = [1, 5], [0, 0], []
        for kind, t, h, w in spec:
            n = h * w // 4
            grids[kind].append([t, h, w])
            items.append((kind, n, t))
            token, value = (IMG, 1) if kind == "image" else (video_id, 2)
            if kind == "video" and name in PER_FRAME:  # a timestamp token before every slice
                for s in range(t):
                    ids += [20 + s, START] + [token] * n + [END]
                    kinds += [0, 0] + [value] * n + [0]
            else:
                ids += [START] + [token] * (t * n) + [END]
                kinds += [0] + [value] * (t * n) + [0]
            ids.append(7)
            kinds.append(0)
        rows.append(ids)
        row_types.append(kinds)
        layout.append(items)
    ids, mask = left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if types:
        inputs["mm_token_type_ids"] = left_pad(row_types)[0].int()
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid_thw = torch.tensor(grids[kind])
            inputs[grid] = grid_thw
            inputs[pixels] = torch.randn(int(grid_thw.prod(-1).sum()), PATCH_DIM, generator=g)
    return inputs, layout


def _forward_spied(model, inputs):
    """(output, the keyword arguments the language model got)."""
    output, (spy,) = spied_forward(model, inputs, model.model.language_model)
    return output, spy.calls[0]


def _contents(name):
    # transformers' own GLM-4V scatters images and videos into one placeholder id and cannot take both at once.
    return ("image", "video") if name in GLM else ("mixed",)


def test_full_budget_is_identity(family):
    # "mixed" is forward() with both pixel_values and pixel_values_videos, which used to raise.
    name, model = family
    for content in _contents(name):
        inputs, _ = make_inputs(name, content)
        assert_full_budget_is_identity(model, inputs, 10_000, content)


@pytest.mark.parametrize("content", ["mixed", "video"])
def test_prefill_gets_exactly_the_kept_tokens(family, content):
    name, model = family
    if name in GLM and content == "mixed":
        content = "image"
    inputs, layout = make_inputs(name, content)
    budget, video_budget = 5, 3
    hiprune_ops.apply_hiprune(model, budget=budget, video_budget=video_budget)
    output, (spy, outer) = spied_forward(model, inputs, model.model.language_model, model.model)
    state = integrations.hiprune_state(model)
    embeds, mask = spy.calls[0]["inputs_embeds"], spy.calls[0]["attention_mask"]
    text = inputs["attention_mask"].sum(1) - sum((inputs["input_ids"] == i).sum(1) for i in (IMG, VID))
    expected = [int(t) + sum(min(budget if kind == "image" else video_budget, n) * slices
                             for kind, n, slices in items) for t, items in zip(text, layout)]
    assert [int(m) for m in mask.sum(1)] == expected
    assert embeds.shape[1] == max(expected) == output.logits.shape[1]
    # Per image and per video slice: exactly its budget, with the slice's full count recorded.
    videos = [n for items in layout for kind, n, slices in items if kind == "video" for _ in range(slices)]
    images = [n for items in layout for kind, n, _ in items if kind == "image"]
    if videos:
        assert state.last_video.full_counts == videos
        assert [f.shape[0] for f in state.last_video.features] == [video_budget] * len(videos)
    if images:
        assert state.last.full_counts == images
        assert [f.shape[0] for f in state.last.features] == [budget] * len(images)
    else:
        assert state.last is None
    # The visual rows of the prefill are the unpatched tower's merged tokens at the kept indices, in order.
    shrunk_types = outer.calls[0]["mm_token_type_ids"]
    for value, encoded, kind in ((1, state.last, "image"), (2, state.last_video, "video")):
        if encoded is None:
            continue
        pixels, grid = (inputs["pixel_values"], inputs["image_grid_thw"]) if kind == "image" else (
            inputs["pixel_values_videos"], inputs["video_grid_thw"])
        with torch.no_grad():
            features = getattr(model.model, f"get_{kind}_features")(pixels, grid).pooler_output
        expected_rows = torch.cat(features)[_flat_kept(encoded, grid)]
        torch.testing.assert_close(embeds[shrunk_types == value], expected_rows, atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_mrope_positions(family):
    name, model = family
    content = "video" if name in GLM else "mixed"
    inputs, _ = make_inputs(name, content, seed=4)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs.get("image_grid_thw"),
                                             video_grid_thw=inputs.get("video_grid_thw"),
                                             attention_mask=inputs["attention_mask"])
    hiprune_ops.apply_hiprune(model, ratio=0.25)
    _, call = _forward_spied(model, inputs)
    state = integrations.hiprune_state(model)
    # Which original tokens survive: every text token, and each item's kept placeholders (its kept_slots).
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    keep = inputs["attention_mask"].bool().clone()
    for value, encoded in ((1, state.last), (2, state.last_video)):
        if encoded is None:
            continue
        runs = torch.cat([torch.zeros(n, dtype=torch.bool).index_fill_(0, s, True)
                          for n, s in zip(encoded.full_counts, encoded.kept_slots)])
        keep[types == value] = runs
    positions, mask = call["position_ids"], call["attention_mask"].bool()
    if positions.shape[0] == 4:  # text row first
        positions = positions[1:]
    for row in range(ids.shape[0]):
        assert torch.equal(positions[:, row, mask[row]], full[:, row, keep[row]])


def test_generate_batch_left_padding(family):
    name, model = family
    content = "video" if name in GLM else "mixed"
    inputs, _ = make_inputs(name, content, seed=2)
    hiprune_ops.apply_hiprune(model, budget=6, video_budget=4)
    with spying(model.model.language_model) as (spy,), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt = inputs["input_ids"]
    assert out.shape == (prompt.shape[0], prompt.shape[1] + 4)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    output, call = _forward_spied(model, inputs)
    # The prefill of generate is the pruned prompt, as long as forward's; the first token follows from it.
    assert spy.calls[0]["inputs_embeds"].shape[1] == call["inputs_embeds"].shape[1] < prompt.shape[1]
    assert torch.equal(out[:, prompt.shape[1]], output.logits[:, -1].argmax(-1))


def test_remove_restores_bit_identical_outputs(family):
    name, model = family
    inputs, _ = make_inputs(name, "video" if name in GLM else "mixed", seed=3)
    assert_remove_restores_bit_identical_outputs(model, inputs, budget=4)


def test_each_video_slice_is_selected_on_its_own(family):
    """A slice's selection equals the selection of a one-slice video made of its frames: no buffer, score or
    budget crosses a slice boundary."""
    name, model = family
    inputs, _ = make_inputs(name, "video", seed=5)
    hiprune_ops.apply_hiprune(model, video_ratio=0.3)
    adapter = integrations.hiprune_state(model)
    with torch.no_grad():
        video = adapter.encode({"pixel_values_videos": inputs["pixel_values_videos"],
                                "video_grid_thw": inputs["video_grid_thw"]})["video"]
        pixels, start, slice_index = inputs["pixel_values_videos"], 0, 0
        for t, h, w in inputs["video_grid_thw"].tolist():
            for _ in range(t):
                alone = adapter.encode({"pixel_values_videos": pixels[start:start + h * w],
                                        "video_grid_thw": torch.tensor([[1, h, w]])})["video"]
                start += h * w
                assert torch.equal(alone.indices[0], video.indices[slice_index])
                assert alone.indices[0].shape[0] == round(0.3 * h * w / 4)
                torch.testing.assert_close(alone.features[0], video.features[slice_index], atol=1e-5, rtol=1e-5)
                slice_index += 1


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_deepstack_features_follow_the_kept_tokens(name):
    model = _model(name)
    inputs, _ = make_inputs(name, "mixed", seed=6)
    try:
        hiprune_ops.apply_hiprune(model, budget=5, video_budget=3)
        _, call = _forward_spied(model, inputs)
        state = integrations.hiprune_state(model)
    finally:
        hiprune_ops.remove_hiprune(model)
    with torch.no_grad():
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        videos = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert int(call["visual_pos_masks"].sum()) == 2 * 5 + 4 * 3
    for level, (image_level, video_level) in enumerate(zip(images.deepstack_features, videos.deepstack_features)):
        image_kept = torch.cat(image_level)[_flat_kept(state.last, inputs["image_grid_thw"])]
        video_kept = torch.cat(video_level)[_flat_kept(state.last_video, inputs["video_grid_thw"])]
        # visual_pos_masks order: row 0 image then video, row 1 video then image.
        got = call["deepstack_visual_embeds"][level]
        expected = torch.cat([image_kept[:5], video_kept[:6], video_kept[6:], image_kept[5:]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _flat_kept(encoded, grid_thw):
    """Indices of the kept tokens into the concatenation of every item's merged tokens."""
    starts, offset = [], 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            starts.append(offset)
            offset += h * w // 4
    return torch.cat([s + i for s, i in zip(starts, encoded.indices)])


def test_glm_mixed_prompt_is_one_stream_in_prompt_order():
    # transformers' GLM-4V cannot take this prompt itself; pruned, images and video slices go in as one stream.
    name = "glm4v"
    model = _model(name)
    inputs, _ = make_inputs(name, "mixed", seed=7)
    try:
        hiprune_ops.apply_hiprune(model, budget=5, video_budget=3)
        _, (spy, outer) = spied_forward(model, inputs, model.model.language_model, model.model)
        state = integrations.hiprune_state(model)
    finally:
        hiprune_ops.remove_hiprune(model)
    call = spy.calls[0]
    images, videos = state.last.features, state.last_video.features
    # Row 0: the image, then two video slices; row 1: two video slices, then the image.
    expected = torch.cat([images[0], *videos[:2], *videos[2:], images[1]])
    shrunk = outer.calls[0]["input_ids"]
    torch.testing.assert_close(call["inputs_embeds"][shrunk == IMG], expected, atol=0, rtol=0)
    text = inputs["attention_mask"].sum(1) - (inputs["input_ids"] == IMG).sum(1)
    assert call["attention_mask"].sum(1).tolist() == (text + 5 + 2 * 3).tolist()


def test_video_options_name_themselves(family):
    name, model = family
    with pytest.raises(ValueError, match="video_budget"):
        hiprune_ops.apply_hiprune(model, video_budget=-1)
    with pytest.raises(ValueError, match="video_ratio"):
        hiprune_ops.apply_hiprune(model, video_ratio=1.5)
    with pytest.raises(ValueError, match="video_budget or video_ratio"):
        hiprune_ops.apply_hiprune(model, video_budget=3, video_ratio=0.5)
    with pytest.raises(TypeError, match="video_budget"):
        hiprune_ops.apply_hiprune(model, video_budget=2.5)
    assert integrations.hiprune_state(model) is None and not capture._installed


def test_video_budget_0_keeps_every_video_token(family):
    """settings.py's one rule: budget 0 (like ratio 1.0) switches pruning off, here for the video slices only."""
    name, model = family
    inputs, _ = make_inputs(name, "video", seed=5)
    hiprune_ops.apply_hiprune(model, budget=2, video_budget=0)
    adapter = integrations.hiprune_state(model)
    try:
        with torch.no_grad():
            video = adapter.encode({"pixel_values_videos": inputs["pixel_values_videos"],
                                    "video_grid_thw": inputs["video_grid_thw"]})["video"]
    finally:
        hiprune_ops.remove_hiprune(model)
    slices = [(h // 2) * (w // 2) for t, h, w in inputs["video_grid_thw"].tolist() for _ in range(t)]
    assert [i.tolist() for i in video.indices] == [list(range(n)) for n in slices]


def test_missing_inputs_name_themselves(family):
    name, model = family
    inputs, _ = make_inputs(name, "video", types=False)
    hiprune_ops.apply_hiprune(model, budget=4)
    if name in GLM:  # its video frames use the image id: only the processor's token types tell them apart
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**inputs)
    else:  # the token types are inferred from the placeholder ids
        with_types, _ = make_inputs(name, "video")
        assert torch.equal(_forward_spied(model, inputs)[1]["position_ids"],
                           _forward_spied(model, with_types)[1]["position_ids"])
    inputs, _ = make_inputs(name, "video")
    short = dict(inputs, video_grid_thw=inputs["video_grid_thw"].clone())
    short["video_grid_thw"][0, 0] = 1  # one slice fewer than the pixels and placeholders hold
    with pytest.raises(ValueError, match="video_grid_thw"):
        model(**short)
    del inputs["video_grid_thw"]
    with pytest.raises(ValueError, match="video_grid_thw"):
        model(**inputs)


def test_every_registered_class_is_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "huggingface.md")).read()
    for cls in FAMILIES:
        assert cls in integrations.SUPPORTED_MODELS
        assert cls in hiprune_ops.apply_hiprune.__doc__, cls
        assert f"`{cls}`" in doc, cls
    for builder in BUILDERS:
        assert type(_model(builder)).__name__ in FAMILIES


def test_qwen2_5_window_order_scores_match_eager_attention_maps(monkeypatch):
    """Captured q/k scores of a windowed tower, mapped to raster order, select what the eager attention maps do."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    from transformers.vision_utils import get_vision_window_index

    model = _model("qwen2_5_vl")
    visual = model.model.visual
    inputs, _ = make_inputs("qwen2_5_vl", "video", seed=8)
    maps = {}
    original = modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        output, weights = original(module, *args, **kwargs)
        maps.setdefault(id(module), []).append(weights)
        return output, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    visual.config._attn_implementation = "eager"
    try:
        hiprune_ops.apply_hiprune(model, video_ratio=0.3)
        adapter = integrations.hiprune_state(model)
        with torch.no_grad():
            video = adapter.encode({"pixel_values_videos": inputs["pixel_values_videos"],
                                    "video_grid_thw": inputs["video_grid_thw"]})["video"]
    finally:
        hiprune_ops.remove_hiprune(model)
        visual.config._attn_implementation = "sdpa"
    grid = inputs["video_grid_thw"]
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                              patch_size=visual.patch_size)
    raster = torch.argsort(window_index)
    scores = []
    for layer in (adapter.object_layer, adapter.deep_layer):
        received = torch.cat([w[0].float().mean(dim=(0, 1)) for w in maps[id(visual.blocks[layer - 1].attn)]])
        scores.append(received.reshape(-1, 4).mean(dim=1)[raster])
    start, slice_index = 0, 0
    for t, h, w in grid.tolist():
        n = h * w // 4
        for _ in range(t):
            indices = hiprune_ops.select(scores[0][None, start:start + n], scores[1][None, start:start + n],
                                         round(0.3 * n), h // 2, w // 2)
            assert torch.equal(indices[0], video.indices[slice_index])
            start += n
            slice_index += 1
