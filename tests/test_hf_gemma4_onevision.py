"""apply_hiprune on Gemma 4 (images of their own sizes, padded, pooled by position) and LLaVA-OneVision (AnyRes
tiles; video frames pooled bilinearly), on tiny random models built offline from configs; and the capture's
key-padding mask, which Gemma 4's tower needs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import hiprune_ops  # noqa: E402
from hiprune_ops import integrations  # noqa: E402
from hiprune_ops.integrations import capture  # noqa: E402
from hiprune_ops.integrations.hf.grid import pool_scores  # noqa: E402
from hiprune_ops.integrations.families import bilinear_pool  # noqa: E402
from hf_testing import (TEXT, assert_full_budget_is_identity, assert_generate_returns_prompt_then_greedy,  # noqa: E402
                        assert_remove_restores_bit_identical_outputs, left_pad, spied_forward, spying, unpatch, vit)

START, END, IMAGE, VIDEO = 150, 151, 152, 153

# -- the capture under a key-padding mask ------------------------------------------------------------------------


def _padded_qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    real = torch.tensor([[True] * 7, [True, False, True, True, False, True, False]])
    return q, k, real


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_capture_scores_only_the_real_tokens_behind_a_key_padding_mask(kind):
    q, k, real = _padded_qk()
    allowed = real[:, None, None, :].expand(2, 1, 7, 7)
    mask = allowed if kind == "bool" else torch.zeros(2, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    slot = capture.ScoreSlot()
    slot.record(q, k, mask, {"scaling": 0.5})
    scores = slot.single_score(1)
    for row in range(2):  # each row alone, on its real tokens: softmax over real keys, mean over real queries
        qr, kr = q[row][:, real[row]], k[row][:, real[row]]
        attn = torch.softmax(qr @ kr.transpose(-1, -2) * 0.5, -1)[None]
        torch.testing.assert_close(scores[row][real[row]], hiprune_ops.attention_scores(attn)[0], atol=1e-6, rtol=0)
        assert bool((scores[row][~real[row]] == 0).all())


def test_capture_refuses_a_mask_that_is_not_key_padding():
    q, k, _ = _padded_qk()
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    with pytest.raises(NotImplementedError, match="not a key-padding mask"):
        capture.ScoreSlot().record(q, k, causal, {})


# -- Gemma 4 -----------------------------------------------------------------------------------------------------

PATCH, K, PADDED = 4, 2, 48  # patch size, pooling kernel, patches per padded row (12 soft-token slots)
IMAGE_GRIDS = [(4, 6), (8, 4), (6, 6)]  # patch grids: 6, 8 and 9 soft tokens
FRAME_GRID = (4, 4)  # 4 soft tokens per video frame


@pytest.fixture(scope="module")
def gemma4():
    torch.manual_seed(40)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=PATCH, pooling_kernel_size=K,
                  position_embedding_size=32)
    text = dict(TEXT, head_dim=8, global_head_dim=8, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0)
    config = transformers.Gemma4Config(vision_config=vision, text_config=text, audio_config=None, boi_token_id=START,
                                       eoi_token_id=END, image_token_id=IMAGE, video_token_id=VIDEO,
                                       audio_token_id=156, attn_implementation="sdpa")
    return transformers.Gemma4ForConditionalGeneration(config).eval()


def _patches(grids, g, shuffle=()):
    """(pixel values (n, PADDED, 3 * PATCH ** 2), positions (n, PADDED, 2)): each grid's patches, then padding
    ((-1, -1), zero pixels) as the processor pads; rows listed in `shuffle` hold their patches in a random order."""
    pixels = torch.zeros(len(grids), PADDED, 3 * PATCH * PATCH)
    positions = torch.full((len(grids), PADDED, 2), -1, dtype=torch.long)
    for row, (h, w) in enumerate(grids):
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = torch.stack([x.flatten(), y.flatten()], -1)
        if row in shuffle:
            xy = xy[torch.randperm(h * w, generator=g)]
        positions[row, :h * w] = xy
        pixels[row, :h * w] = torch.rand(h * w, 3 * PATCH * PATCH, generator=g)
    return pixels, positions


def _soft(n, token=IMAGE):
    return [START] + [token] * n + [END]


def gemma4_inputs(seed=0, video=True):
    """Row 0: two images (6 and 8 soft tokens, the second's patches shuffled); row 1: an image of 9, then a
    2-frame video (4 soft tokens per frame)."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5] + _soft(6) + [6] + _soft(8) + [7], [1, 8] + _soft(9) + [9]]
    if video:
        rows[1] += [10] + _soft(4, VIDEO) + [11] + _soft(4, VIDEO) + [12]
    ids, mask = left_pad(rows)
    pixels, positions = _patches(IMAGE_GRIDS, g, shuffle=(1,))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_position_ids=positions)
    if video:
        frames, frame_positions = _patches([FRAME_GRID] * 2, g)
        inputs.update(pixel_values_videos=frames, video_position_ids=frame_positions,
                      num_frames_per_video=torch.tensor([2]))
    return inputs


# -- LLaVA-OneVision -----------------------------------------------------------------------------------------------

OV_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
OV_SIZES = torch.tensor([[24, 64], [64, 64]])  # 1x2 tiles, unpadded to 6x16 (166 tokens); 2x2 tiles (336)
OV_TILES = [3, 5]


def _onevision(image_size, seed):
    torch.manual_seed(seed)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vit(image_size, model_type="siglip_vision_model", vision_use_head=False),
        text_config=dict(TEXT, model_type="qwen2"), image_token_index=IMAGE, video_token_index=VIDEO,
        image_grid_pinpoints=OV_PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
        attn_implementation="sdpa")
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def onevision():  # 32 px tiles of 8x8 patches; video frames pooled to 4x4
    return _onevision(32, 41)


@pytest.fixture(scope="module")
def onevision_odd():  # 28 px frames of 7x7 patches, pooled bilinearly to 4x4 (uneven weights)
    return _onevision(28, 42)


def onevision_inputs(seed=0, video=True, image_size=32):
    """Row 0: a 1x2-tile image, then a 2-frame video (2 x 16 + 1 newline); row 1: a 2x2-tile image."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5] + [IMAGE] * 166 + [6], [1, 8] + [IMAGE] * 336 + [9, 10]]
    if video:
        rows[0] += [VIDEO] * (2 * 16 + 1) + [7]
    ids, mask = left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, image_sizes=OV_SIZES,
                  pixel_values=torch.randn(2, 5, 3, 32, 32, generator=g))
    if video:
        inputs["pixel_values_videos"] = torch.randn(1, 2, 3, image_size, image_size, generator=g)
    return inputs


def onevision_video_inputs(seed=0, image_size=28):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [VIDEO] * (2 * 16 + 1) + [6]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values_videos=torch.randn(1, 2, 3, image_size, image_size, generator=g))


FAMILIES = ["gemma4", "onevision", "onevision_odd"]
INPUTS = {"gemma4": gemma4_inputs, "onevision": onevision_inputs}


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    unpatch(*(request.getfixturevalue(name) for name in FAMILIES if name in request.fixturenames))


def _language_model(model):
    return model.model.language_model


# -- shared properties -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma4", "onevision"])
def test_full_budget_is_identity(request, name):
    model = request.getfixturevalue(name)
    assert_full_budget_is_identity(model, INPUTS[name](), 64 * 5 if name == "onevision" else 12)  # 5 tiles of 64


@pytest.mark.parametrize("name,budget", [("gemma4", 3), ("onevision", 10)])
def test_remove_restores_bit_identical_outputs(request, name, budget):
    model = request.getfixturevalue(name)
    assert_remove_restores_bit_identical_outputs(model, INPUTS[name](), budget=budget)


def _kept_lengths(inputs, removed_per_row):
    return [int(n) - r for n, r in zip(inputs["attention_mask"].sum(1), removed_per_row)]


@pytest.mark.parametrize("name,budget", [("gemma4", 5), ("onevision", 12)])
def test_generate_batch_left_padded_prefill_and_positions(request, name, budget):
    model = request.getfixturevalue(name)
    inputs = INPUTS[name]()
    hiprune_ops.apply_hiprune(model, budget=budget, video_budget=3)
    with spying(_language_model(model).rotary_emb) as (rotary,), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert_generate_returns_prompt_then_greedy(model, inputs, out, 3)
    state = integrations.hiprune_state(model)
    image_kept = [f.shape[0] for f in state.last.features]
    video_kept = [f.shape[0] for f in state.last_video.features]
    removed = [0, 0]
    if name == "gemma4":  # images 6, 8 | 9, frames 4, 4: budget 5 clamps the first
        assert image_kept == [5, 5, 5] and video_kept == [3, 3]
        removed = [1 + 3, 4 + 1 + 1]
    else:  # budget 12 over 3 and 5 tiles: 4 and 2 per tile; the video: 2 frames x 3, then the newline
        assert image_kept == [12, 10] and video_kept == [7]
        removed = [166 - 12 + 33 - 7, 336 - 10]
    lengths = _kept_lengths(inputs, removed)
    calls = [c["args"][1] if len(c["args"]) > 1 else c["position_ids"] for c in rotary.calls]
    prefill, first_step = calls[0], next(c for c in calls if c.shape[-1] == 1)
    assert prefill.shape[-1] == max(lengths)
    for row, length in enumerate(lengths):  # recompacted: 0.. over each row's real tokens
        assert torch.equal(prefill.reshape(-1, prefill.shape[-1])[row, -length:], torch.arange(length))
    assert first_step.flatten().tolist() == lengths


# -- Gemma 4 -----------------------------------------------------------------------------------------------------

def _gemma4_all_features(model, inputs):
    """Every soft token of every image and frame, from the unpatched model's own feature calls."""
    with torch.no_grad():
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_position_ids"],
                                               num_frames_per_video=inputs["num_frames_per_video"]).pooler_output
    frame_tokens = (FRAME_GRID[0] // K) * (FRAME_GRID[1] // K)
    return list(images), list(torch.cat(video).split(frame_tokens))


def test_gemma4_prefill_gets_exactly_the_kept_tokens_per_image_and_frame(gemma4):
    inputs = gemma4_inputs()
    images, frames = _gemma4_all_features(gemma4, inputs)
    assert [f.shape[0] for f in images] == [6, 8, 9]
    hiprune_ops.apply_hiprune(gemma4, budget=7, video_ratio=0.5)
    _, (spy, outer) = spied_forward(gemma4, inputs, _language_model(gemma4), gemma4.model)
    state = integrations.hiprune_state(gemma4)
    assert state.last.full_counts == [6, 8, 9] and state.last_video.full_counts == [4, 4]
    assert [i.shape[0] for i in state.last.indices] == [6, 7, 7]  # clamped to the first image
    assert [i.shape[0] for i in state.last_video.indices] == [2, 2]
    assert all(bool((i.diff() > 0).all()) for i in state.last.indices + state.last_video.indices)
    embeds, ids = spy.calls[0]["inputs_embeds"], outer.calls[0]["input_ids"]
    assert [int(n) for n in (ids == IMAGE).sum(1)] == [13, 7] and [int(n) for n in (ids == VIDEO).sum(1)] == [0, 4]
    for token, features, indices in ((IMAGE, images, state.last.indices), (VIDEO, frames, state.last_video.indices)):
        kept = torch.cat([f[i] for f, i in zip(features, indices)])
        torch.testing.assert_close(embeds[ids == token], kept.to(embeds.dtype), atol=1e-6, rtol=0)
    for marker in (START, END):  # the start / end markers stay
        assert torch.equal((ids == marker).sum(1), (inputs["input_ids"] == marker).sum(1))


def test_gemma4_processor_output_of_two_image_sizes(gemma4):
    # The image processor's own layout: (x, y) positions in raster order, padding at the end of each row.
    from PIL import Image

    processor = transformers.Gemma4ImageProcessorPil(patch_size=PATCH, max_soft_tokens=70, pooling_kernel_size=K)
    g = torch.Generator().manual_seed(3)
    images = [Image.fromarray(torch.randint(0, 255, size, generator=g, dtype=torch.uint8).numpy())
              for size in ((40, 24, 3), (32, 32, 3))]
    pixels = processor(images, return_tensors="pt")
    counts = pixels["num_soft_tokens_per_image"].tolist()
    ids = torch.tensor([[1, 5] + _soft(counts[0]) + [6] + _soft(counts[1]) + [7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                  image_position_ids=pixels["image_position_ids"])
    with torch.no_grad():
        features = gemma4.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    hiprune_ops.apply_hiprune(gemma4, ratio=0.25)
    _, (spy, outer) = spied_forward(gemma4, inputs, _language_model(gemma4), gemma4.model)
    state = integrations.hiprune_state(gemma4).last
    assert state.full_counts == counts == [f.shape[0] for f in features]
    assert [i.shape[0] for i in state.indices] == [round(0.25 * n) for n in counts]
    embeds, shrunk = spy.calls[0]["inputs_embeds"], outer.calls[0]["input_ids"]
    kept = torch.cat([f[i] for f, i in zip(features, state.indices)])
    torch.testing.assert_close(embeds[shrunk == IMAGE], kept, atol=1e-6, rtol=0)


def _eager(tower, *args, **kwargs):
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(*args, output_attentions=True, **kwargs).attentions
    finally:
        tower.set_attn_implementation("sdpa")


def test_gemma4_selection_equals_hiprune_on_eager_maps_of_the_real_patches(gemma4):
    inputs = gemma4_inputs(1, video=False)
    hiprune_ops.apply_hiprune(gemma4, budget=4)
    with torch.no_grad():
        gemma4(**inputs)
    state = integrations.hiprune_state(gemma4)
    attentions = _eager(gemma4.model.vision_tower, inputs["pixel_values"],
                        pixel_position_ids=inputs["image_position_ids"])
    for row, (h, w) in enumerate(IMAGE_GRIDS):
        positions = inputs["image_position_ids"][row]
        real = (positions != -1).all(-1)
        raster = positions[real, 1] * w + positions[real, 0]  # each real patch's raster index on its grid
        order = raster.argsort()
        scores = []
        for layer in (state.object_layer, state.deep_layer):
            attn = attentions[layer - 1][row:row + 1][:, :, real][..., real]  # real queries x real keys
            attn = attn[:, :, order][..., order]  # raster order
            scores.append(pool_scores(hiprune_ops.attention_scores(attn), h, w, K))
        indices, roles = hiprune_ops.select_with_roles(*scores, 4, h // K, w // K)
        assert torch.equal(state.last.indices[row], indices[0])
        assert torch.equal(state.last.roles[row], roles[0])


def test_gemma4_defaults_and_bad_input(gemma4):
    hiprune_ops.apply_hiprune(gemma4)
    state = integrations.hiprune_state(gemma4)
    assert (state.object_layer, state.deep_layer) == (2, 4)  # round_half_even(4 * 9 / 24), the last
    inputs = gemma4_inputs(video=False)
    with torch.no_grad():
        gemma4(**inputs)
    assert [i.shape[0] for i in state.last.indices] == [2, 3, 3]  # 1/3 of 6, 8, 9
    with pytest.raises(ValueError, match="image_position_ids"):
        gemma4(**{k: v for k, v in inputs.items() if k != "image_position_ids"})
    broken = dict(inputs, image_position_ids=inputs["image_position_ids"].clone())
    broken["image_position_ids"][0, 5] = -1  # a hole in the first image's grid
    with pytest.raises(ValueError, match="not a full"):
        gemma4(**broken)
    video = gemma4_inputs()
    with pytest.raises(ValueError, match="num_frames_per_video"):
        gemma4(**{k: v for k, v in video.items() if k != "num_frames_per_video"})
    hiprune_ops.remove_hiprune(gemma4)
    with pytest.raises(ValueError, match="video_ratio"):
        hiprune_ops.apply_hiprune(gemma4, video_ratio=1.5)
    assert "_hiprune_state" not in gemma4.__dict__


# -- LLaVA-OneVision ---------------------------------------------------------------------------------------------

def _tiled_raster(indices, projected, rows, cols, grid=8):
    """A pruned image's expected rows: its base tokens, then the tiles' kept tokens in raster order over the whole
    rows x cols tiled grid."""
    expected = [projected[0][i] for i in indices[0].tolist()]
    kept = [set(i.tolist()) for i in indices]
    for y in range(rows * grid):
        for x in range(cols * grid):
            tile, patch = 1 + (y // grid) * cols + x // grid, (y % grid) * grid + x % grid
            if patch in kept[tile]:
                expected.append(projected[tile][patch])
    return torch.stack(expected)


def test_onevision_prefill_gets_exactly_the_kept_tokens_per_tile_and_frame(onevision):
    inputs = onevision_inputs()
    with torch.no_grad():
        reference = onevision.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        tower = onevision.model.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        projected = onevision.model.multi_modal_projector(tower.hidden_states[-1]).unflatten(0, (2, 5))
        video = onevision.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    hiprune_ops.apply_hiprune(onevision, budget=9, video_budget=5)
    _, (spy, outer) = spied_forward(onevision, inputs, _language_model(onevision), onevision.model)
    state = integrations.hiprune_state(onevision)
    assert state.last.full_counts == [f.shape[0] for f in reference] == [166, 336]  # unpadded, row newlines
    assert [tuple(i.shape) for i in state.last.indices] == [(3, 3), (5, 1)]  # 9 // 3 and 9 // 5 per tile
    assert state.last_video.full_counts == [33] and [tuple(i.shape) for i in state.last_video.indices] == [(5,)] * 2
    embeds, ids = spy.calls[0]["inputs_embeds"], outer.calls[0]["input_ids"]
    expected = torch.cat([_tiled_raster(state.last.indices[0], projected[0], 1, 2),
                          _tiled_raster(state.last.indices[1], projected[1], 2, 2)])
    torch.testing.assert_close(embeds[ids == IMAGE], expected.to(embeds.dtype), atol=1e-6, rtol=0)
    # The video: each frame's kept pooled tokens, then the newline after the whole video.
    frames = [video[f * 16:(f + 1) * 16][i] for f, i in enumerate(state.last_video.indices)]
    torch.testing.assert_close(embeds[ids == VIDEO], torch.cat(frames + [video[-1:]]), atol=1e-6, rtol=0)
    assert [int(n) for n in (ids == VIDEO).sum(1)] == [11, 0]


def test_onevision_video_pooling_of_scores_is_the_models_own(onevision_odd):
    # apply_pooling on a map of patch scores pools them exactly as it pools the features (bilinear, 7x7 -> 4x4).
    scores = torch.rand(3, 49)
    pooled = onevision_odd.model.apply_pooling(scores[..., None])[..., 0]
    torch.testing.assert_close(bilinear_pool(scores, 7, 7), pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(pooled, pool_scores(torch.nn.functional.pad(scores.reshape(3, 7, 7), (0, 1, 0, 1))
                                                  .flatten(1), 8, 8, 2))  # not a 2x2 mean on odd grids


def test_onevision_video_selection_equals_hiprune_on_eager_maps(onevision_odd):
    inputs = onevision_video_inputs()
    hiprune_ops.apply_hiprune(onevision_odd, video_budget=6)
    with torch.no_grad():
        onevision_odd(**inputs)
    state = integrations.hiprune_state(onevision_odd)
    attentions = _eager(onevision_odd.model.vision_tower, inputs["pixel_values_videos"].flatten(0, 1))
    obj, deep = (onevision_odd.model.apply_pooling(hiprune_ops.attention_scores(attentions[layer - 1])[..., None])
                 [..., 0] for layer in (state.object_layer, state.deep_layer))
    indices, roles = hiprune_ops.select_with_roles(obj, deep, 6, 4, 4)
    assert torch.equal(torch.stack(state.last_video.indices), indices)
    assert torch.equal(torch.stack(state.last_video.roles), roles)


def test_onevision_defaults_and_bad_input(onevision):
    hiprune_ops.apply_hiprune(onevision)
    state = integrations.hiprune_state(onevision)
    assert (state.object_layer, state.deep_layer, state.num_prefix) == (1, 3, 0)  # 3 layers; no CLS
    inputs = onevision_inputs(video=False)
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        onevision(**inputs, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="image_sizes"):
        onevision(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    video = onevision_video_inputs(image_size=32)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        onevision(**dict(video, pixel_values_videos=video["pixel_values_videos"][0]))
    hiprune_ops.remove_hiprune(onevision)
    with pytest.raises(ValueError, match="video_budget"):
        hiprune_ops.apply_hiprune(onevision, video_budget=-1)
    assert "_hiprune_state" not in onevision.__dict__
    hiprune_ops.apply_hiprune(onevision, budget=2)
    with pytest.raises(ValueError, match="budget=2 leaves no token per tile for an image with 3 tiles"):
        onevision(**inputs)


def test_onevision_multi_image_prompt_gives_each_image_one_tile(onevision):
    # batch_num_images > 1: the model feeds only each image's base tile (then one newline); so does the pruning.
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([[1, 5] + [IMAGE] * 65 + [6] + [IMAGE] * 65 + [7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=OV_SIZES,
                  batch_num_images=torch.tensor([2]), pixel_values=torch.randn(2, 5, 3, 32, 32, generator=g))
    assert_full_budget_is_identity(onevision, inputs, 64)
    hiprune_ops.apply_hiprune(onevision, budget=10)
    _, (spy, outer) = spied_forward(onevision, inputs, _language_model(onevision), onevision.model)
    state = integrations.hiprune_state(onevision).last
    assert state.full_counts == [65, 65] and [tuple(i.shape) for i in state.indices] == [(1, 10), (1, 10)]
    assert int((outer.calls[0]["input_ids"] == IMAGE).sum()) == 20
