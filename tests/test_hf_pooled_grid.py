"""apply_hiprune on the grid.py families and the refused ones, on tiny random models built offline from configs.

InternVL (pixel_shuffle 2x2), Gemma 3 (4x4 average pool), PaliGemma (no pooling): 16 language-model tokens per
tile (a 4x4 grid). LLaVA with a Pixtral tower and Mistral 3 (2x2 merger): images of their own sizes, packed by the
tower behind a block-diagonal mask.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import hiprune_ops  # noqa: E402
from hiprune_ops import integrations  # noqa: E402
from hiprune_ops.integrations import capture  # noqa: E402
from hiprune_ops.integrations.hf.grid import pool_scores  # noqa: E402
from hf_testing import (TEXT, assert_full_budget_is_identity, assert_generate_returns_prompt_then_greedy,  # noqa: E402
                        assert_remove_restores_bit_identical_outputs, left_pad, spied_forward, spying, unpatch, vit)

IMAGE, START, END = 151, 150, 152  # image placeholder and its start / end markers, both families
TOKENS = 16  # language-model tokens per tile (4x4)


def _text(**extra):
    return dict(TEXT, **extra)


def _siglip(image_size):
    return vit(image_size, model_type="siglip_vision_model", vision_use_head=False)


@pytest.fixture(scope="module")
def internvl():
    torch.manual_seed(20)
    config = transformers.InternVLConfig(
        vision_config=vit(32, num_hidden_layers=4), text_config=_text(model_type="qwen2"), image_token_id=IMAGE,
        image_seq_length=TOKENS, attn_implementation="sdpa")
    return transformers.InternVLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(21)
    config = transformers.Gemma3Config(
        vision_config=_siglip(64),
        text_config=_text(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        mm_tokens_per_image=TOKENS, image_token_id=IMAGE, boi_token_index=START, eoi_token_index=END,
        attn_implementation="sdpa")
    return transformers.Gemma3ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def paligemma():
    torch.manual_seed(23)
    config = transformers.PaliGemmaConfig(
        vision_config=_siglip(16), text_config=_text(model_type="gemma", head_dim=8), image_token_index=IMAGE,
        projection_dim=32, attn_implementation="sdpa")
    return transformers.PaliGemmaForConditionalGeneration(config).eval()


def _pixtral():
    return vit(32, model_type="pixtral", head_dim=8)


@pytest.fixture(scope="module")
def llava_pixtral():
    torch.manual_seed(24)
    config = transformers.LlavaConfig(vision_config=_pixtral(), text_config=_text(model_type="mistral"),
                                      image_token_id=IMAGE, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", attn_implementation="sdpa")
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def mistral3():
    torch.manual_seed(25)
    config = transformers.Mistral3Config(vision_config=_pixtral(), text_config=_text(model_type="mistral"),
                                         image_token_id=IMAGE, vision_feature_layer=-1, attn_implementation="sdpa")
    return transformers.Mistral3ForConditionalGeneration(config).eval()


def _idefics(config_class, model_class, image_size, scale_factor, seed):
    torch.manual_seed(seed)
    config = config_class(vision_config=vit(image_size), text_config=_text(model_type="llama"), image_token_id=IMAGE,
                          scale_factor=scale_factor, attn_implementation="sdpa")
    return model_class(config).eval()


@pytest.fixture(scope="module")
def idefics3():  # 8x8 patches, pixel_shuffle 2: 4x4 tokens per tile
    return _idefics(transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration, 32, 2, 26)


@pytest.fixture(scope="module")
def smolvlm():  # 16x16 patches, pixel_shuffle 4: 4x4 tokens per tile
    return _idefics(transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration, 64, 4, 27)


FAMILIES = ["internvl", "gemma3", "paligemma", "llava_pixtral", "mistral3", "idefics3", "smolvlm"]
TILES = {"internvl": 6}  # selections per forward of each family's inputs (default 3)
FIRST_POSITION = {"paligemma": 1}  # PaliGemma counts positions from 1, the others from 0


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    unpatch(*(request.getfixturevalue(name) for name in FAMILIES if name in request.fixturenames))


def _run(tiles):
    return [START] + [IMAGE] * (TOKENS * tiles) + [END]


def internvl_inputs(seed=0):
    """Row 0: an image of 2 tiles + thumbnail, then a 2-frame video (frames are images); row 1: a 1-tile image."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5] + _run(3) + [6, 7, 30] + _run(1) + [31] + _run(1) + [8], [1, 9] + _run(1) + [10, 11]]
    ids, mask = left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(6, 3, 32, 32, generator=g))


def gemma3_inputs(seed=0):
    """Row 0: two images; row 1: one image. token_type_ids mark the image tokens, as the processor does."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5, 3] + _run(1) + [3, 6] + _run(1) + [3, 7], [1, 8, 3] + _run(1) + [3, 9, 10]]
    ids, mask = left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMAGE).long(),
                pixel_values=torch.randn(3, 3, 64, 64, generator=g))


def paligemma_inputs(seed=0):
    """Row 0: two images; row 1: one image; image tokens first, then the prompt, all one bidirectional prefix."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([[IMAGE] * 2 * TOKENS + [1, 5, 6], [IMAGE] * TOKENS + [1, 7]])
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                pixel_values=torch.randn(3, 3, 16, 16, generator=g))


BREAK, IMAGE_END = 153, 154
PIXTRAL_SIZES = torch.tensor([[16, 24], [32, 16], [24, 32]])  # (h, w) pixels: patch grids 4x6, 8x4, 6x8


def _pixtral_image(rows, cols):
    """An image in a Pixtral prompt: rows of [IMG] tokens, each ended by [IMG_BREAK], the last by [IMG_END]."""
    tokens = ([IMAGE] * cols + [BREAK]) * rows
    return tokens[:-1] + [IMAGE_END]


def pixtral_inputs(merge, seed=0):
    """Row 0: two images of different sizes; row 1: a third. merge: Mistral 3's patch merger (2) or none (1)."""
    g = torch.Generator().manual_seed(seed)
    grids = [(h // 4 // merge, w // 4 // merge) for h, w in PIXTRAL_SIZES.tolist()]
    rows = [[1, 5] + _pixtral_image(*grids[0]) + [6] + _pixtral_image(*grids[1]) + [7],
            [1, 8] + _pixtral_image(*grids[2]) + [9, 10]]
    ids, mask = left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, image_sizes=PIXTRAL_SIZES,
                pixel_values=torch.randn(3, 3, 32, 32, generator=g))


def idefics_inputs(image_size, seed=0):
    """Row 0: two tiles; row 1: one tile and an all-zero padding tile (unmasked: dropped by the model itself)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([[1, 5] + _run(1) + [6] + _run(1) + [7], [1, 8] + _run(1) + [9, 10]])
    pixel_values = torch.randn(2, 2, 3, image_size, image_size, generator=g)
    pixel_values[1, 1] = 0
    pixel_mask = torch.ones(2, 2, image_size, image_size, dtype=torch.long)
    pixel_mask[1, 1] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, pixel_attention_mask=pixel_mask)


INPUTS = {"internvl": internvl_inputs, "gemma3": gemma3_inputs, "paligemma": paligemma_inputs,
          "llava_pixtral": lambda: pixtral_inputs(1), "mistral3": lambda: pixtral_inputs(2),
          "idefics3": lambda: idefics_inputs(32), "smolvlm": lambda: idefics_inputs(64)}


def _model_and_inputs(request, name):
    return request.getfixturevalue(name), INPUTS[name]()


def _language_model(model):
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model  # Idefics3 / SmolVLM


def _all_features(name, model, inputs):
    """Every token's projected features per tile, from the unpatched model's own get_image_features."""
    extra = {}
    if "pixtral" in name or name == "mistral3":
        extra = dict(image_sizes=inputs["image_sizes"], vision_feature_layer=-1)
        if name == "llava_pixtral":
            extra["vision_feature_select_strategy"] = "full"
    if name in ("idefics3", "smolvlm"):  # per prompt row, (tiles * tokens, D)
        extra = dict(pixel_attention_mask=inputs["pixel_attention_mask"])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    if name in ("idefics3", "smolvlm"):
        features = torch.cat(list(features)).unflatten(0, (-1, TOKENS))
    return features


def _expected_lengths(inputs, state, budget):
    """Each row's real tokens after pruning: every tile of the row keeps min(budget, its tokens)."""
    lengths, tile = [], 0
    for row_tokens, image_tokens in zip(inputs["attention_mask"].sum(1).tolist(),
                                        (inputs["input_ids"] == IMAGE).sum(1).tolist()):
        while image_tokens > 0:
            full = state.full_counts[tile]
            row_tokens -= full - min(budget, full)
            image_tokens -= full
            tile += 1
        lengths.append(row_tokens)
    return lengths


@pytest.mark.parametrize("name", FAMILIES)
def test_full_budget_is_identity(request, name):
    model, inputs = _model_and_inputs(request, name)
    assert_full_budget_is_identity(model, inputs, 64 if name in ("llava_pixtral", "mistral3") else TOKENS)


@pytest.mark.parametrize("name,budget", [("internvl", 5), ("gemma3", 7), ("paligemma", 3), ("llava_pixtral", 9),
                                         ("mistral3", 5), ("idefics3", 6), ("smolvlm", 2)])
def test_prefill_gets_exactly_the_kept_tokens_per_tile(request, name, budget):
    model, inputs = _model_and_inputs(request, name)
    all_features = _all_features(name, model, inputs)
    hiprune_ops.apply_hiprune(model, budget=budget)
    _, (spy, outer) = spied_forward(model, inputs, _language_model(model), model.model)
    state = integrations.hiprune_state(model).last
    assert len(state.indices) == TILES.get(name, 3)  # one selection per tile / thumbnail / frame
    assert all(i.shape == (min(budget, n),) and bool((i.diff() > 0).all())
               for i, n in zip(state.indices, state.full_counts))
    if name == "mistral3":
        assert state.full_counts == [6, 8, 12]  # the 2x2-merged grids 2x3, 4x2, 3x4: the last keeps all 5 of 12
    embeds = spy.calls[0]["inputs_embeds"]
    expected = _expected_lengths(inputs, state, budget)
    assert embeds.shape[1] == max(expected)
    valid = outer.calls[0]["attention_mask"]  # Gemma 3's and PaliGemma's LM get a 4-D mask (dict)
    assert [int(m) for m in valid.sum(1)] == expected
    # The image rows are the model's own features of the kept tokens, tile after tile.
    kept = torch.cat([f[i] for f, i in zip(all_features, state.indices)])
    shrunk_ids = outer.calls[0]["input_ids"]
    torch.testing.assert_close(embeds[shrunk_ids == IMAGE], kept.to(embeds.dtype), atol=1e-6, rtol=0)
    if "pixtral" in name or name == "mistral3":  # row markers are never pruned
        for marker in (BREAK, IMAGE_END):
            assert torch.equal((shrunk_ids == marker).sum(1), (inputs["input_ids"] == marker).sum(1))


def _state_and_eager_maps(model, inputs, budget, **tower_inputs):
    """Prunes one forward at `budget`; returns the adapter and the tower's eager attention maps of the same pixels."""
    hiprune_ops.apply_hiprune(model, budget=budget)
    with torch.no_grad():
        model(**inputs)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = tower(inputs["pixel_values"], output_attentions=True, **tower_inputs).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    return integrations.hiprune_state(model), attentions


def _assert_selection_matches_eager_maps(model, inputs, budget, side, k, num_prefix):
    """Each tile's selection equals HiPrune on the tower's eager attention maps (prefix excluded), pooled k x k."""
    state, attentions = _state_and_eager_maps(model, inputs, budget)
    obj, deep = (pool_scores(hiprune_ops.attention_scores(attentions[layer - 1], num_prefix), side, side, k)
                 for layer in (state.object_layer, state.deep_layer))
    indices, roles = hiprune_ops.select_with_roles(obj, deep, budget, side // k, side // k)
    assert torch.equal(torch.stack(state.last.indices), indices)
    assert torch.equal(torch.stack(state.last.roles), roles)


def test_internvl_scores_are_pooled_over_the_pixel_shuffle_groups(internvl):
    # pixel_shuffle 0.5 on a map of patch scores gives, per LM token, its 4 patches: their mean is what we pool.
    scores = torch.randn(3, 64, dtype=torch.float64)
    shuffled = internvl.model.pixel_shuffle(scores.reshape(3, 8, 8, 1)).reshape(3, TOKENS, 4)
    torch.testing.assert_close(pool_scores(scores, 8, 8, 2), shuffled.mean(-1), atol=1e-12, rtol=0)
    _assert_selection_matches_eager_maps(internvl, internvl_inputs(1), 6, 8, 2, num_prefix=1)  # CLS excluded


@pytest.mark.parametrize("name,side,k", [("idefics3", 8, 2), ("smolvlm", 16, 4)])
def test_idefics_scores_are_pooled_over_the_pixel_shuffle_groups(request, name, side, k):
    model = request.getfixturevalue(name)
    scores = torch.randn(3, side * side, dtype=torch.float64)
    shuffled = model.model.connector.pixel_shuffle(scores[..., None], k)  # (3, tokens, k * k): each token's patches
    torch.testing.assert_close(pool_scores(scores, side, side, k), shuffled.mean(-1), atol=1e-12, rtol=0)


def test_idefics3_padded_tiles_are_refused(idefics3):
    inputs = idefics_inputs(32)
    inputs["pixel_attention_mask"][0, 0, :, 28:] = 0  # a real tile with a padded right edge
    hiprune_ops.apply_hiprune(idefics3, budget=4)
    with pytest.raises(NotImplementedError, match="Idefics3ForConditionalGeneration with padded tiles"):
        idefics3(**inputs)


def test_gemma3_scores_are_pooled_like_the_features(gemma3):
    projector = gemma3.model.multi_modal_projector
    scores = torch.randn(2, 256, dtype=torch.float64)
    pooled = projector.avg_pool(scores.reshape(2, 1, 16, 16)).flatten(1)
    torch.testing.assert_close(pool_scores(scores, 16, 16, 4), pooled, atol=1e-12, rtol=0)
    _assert_selection_matches_eager_maps(gemma3, gemma3_inputs(1), 6, 16, 4, num_prefix=0)


@pytest.mark.parametrize("name,merge", [("llava_pixtral", 1), ("mistral3", 2)])
def test_pixtral_scores_each_image_within_its_block(request, name, merge):
    # The tower packs the images into one sequence behind a block-diagonal mask; each image is scored on its own
    # block of the eager attention maps, pooled over Mistral 3's 2x2 merge groups.
    model, inputs = _model_and_inputs(request, name)
    state, attentions = _state_and_eager_maps(model, inputs, 4, image_sizes=inputs["image_sizes"])
    start = 0
    for image, (h, w) in enumerate((PIXTRAL_SIZES // 4).tolist()):
        block = slice(start, start + h * w)
        start += h * w
        obj, deep = (pool_scores(hiprune_ops.attention_scores(attentions[layer - 1][:, :, block, block]), h, w, merge)
                     for layer in (state.object_layer, state.deep_layer))
        indices, _ = hiprune_ops.select_with_roles(obj, deep, 4, h // merge, w // merge)
        assert torch.equal(state.last.indices[image], indices[0])


def test_pixtral_needs_image_sizes_and_full_strategy(llava_pixtral):
    inputs = pixtral_inputs(1)
    hiprune_ops.apply_hiprune(llava_pixtral, budget=4)
    with pytest.raises(ValueError, match="image_sizes"):
        llava_pixtral(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        llava_pixtral(**inputs, vision_feature_select_strategy="default")


def test_gemma3_bidirectional_image_mask_covers_exactly_the_kept_tokens(gemma3):
    inputs = gemma3_inputs(2)
    hiprune_ops.apply_hiprune(gemma3, budget=5)
    _, (spy, outer) = spied_forward(gemma3, inputs, gemma3.model.language_model, gemma3.model)
    ids, valid, types = (outer.calls[0][k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    valid = valid.bool()
    assert torch.equal(types, (ids == IMAGE).long() * valid)  # token types shrank with the prompt
    full = spy.calls[0]["attention_mask"]["full_attention"][:, 0]
    length = ids.shape[1]
    # Expected, independently: causal over real tokens, plus every pair inside one image's run of kept tokens.
    run = torch.cumsum((ids == START).long(), dim=1) * (ids == IMAGE)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_image = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] > 0)
    expected = (causal | same_image) & valid[:, None, :]
    assert [int((r > 0).sum()) for r in run] == [10, 5]
    assert torch.equal(full[valid], expected[valid])


@pytest.mark.parametrize("name,budget", [("internvl", 6), ("gemma3", 4), ("paligemma", 2), ("llava_pixtral", 7),
                                         ("mistral3", 3), ("idefics3", 5), ("smolvlm", 3)])
def test_generate_batch_left_padded_prefill_and_positions(request, name, budget):
    model, inputs = _model_and_inputs(request, name)
    hiprune_ops.apply_hiprune(model, budget=budget)
    with spying(_language_model(model).rotary_emb) as (rotary,), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert_generate_returns_prompt_then_greedy(model, inputs, out, 3)
    # The position_ids of every rotary embedding call: rotary_emb(x, position_ids).
    calls = [c["args"][1] if len(c["args"]) > 1 else c["position_ids"] for c in rotary.calls]
    lengths = _expected_lengths(inputs, integrations.hiprune_state(model).last, budget)
    # Prefill: exactly the shrunk prompt, left padded; the kept tokens are recompacted (positions 0.. per row).
    prefill, first_step = calls[0], next(c for c in calls if c.shape[-1] == 1)
    assert prefill.shape == (2, max(lengths))
    first = FIRST_POSITION.get(name, 0)
    for row, length in enumerate(lengths):
        assert torch.equal(prefill[row, -length:], torch.arange(length) + first)
    # The first generated token sits right after the shrunk prompt.
    assert first_step.flatten().tolist() == [length + first for length in lengths]


@pytest.mark.parametrize("name", FAMILIES)
def test_remove_restores_bit_identical_outputs(request, name):
    model, inputs = _model_and_inputs(request, name)
    assert_remove_restores_bit_identical_outputs(model, inputs, budget=3)


def test_defaults_and_bad_arguments(internvl, gemma3):
    hiprune_ops.apply_hiprune(internvl)
    state = integrations.hiprune_state(internvl)
    # 4 layers: object round_half_even(4 * 9 / 24) = 2, deep = vision_feature_layer -1 = 4; 16 / 3 -> 5 per tile.
    assert (state.object_layer, state.deep_layer, state.per_tile) == (2, 4, 5)
    hiprune_ops.apply_hiprune(gemma3)
    state = integrations.hiprune_state(gemma3)
    assert (state.object_layer, state.deep_layer, state.per_tile) == (1, 3, 5)
    hiprune_ops.remove_hiprune(gemma3)
    with pytest.raises(ValueError, match="budget"):
        hiprune_ops.apply_hiprune(gemma3, budget=TOKENS + 1)
    with pytest.raises(ValueError, match="deep_layer"):
        hiprune_ops.apply_hiprune(gemma3, deep_layer=4)
    with pytest.raises(ValueError, match="video_budget"):  # Gemma 3 takes no video (InternVL: frames are images)
        hiprune_ops.apply_hiprune(gemma3, video_budget=4)
    assert "_hiprune_state" not in gemma3.__dict__
    inputs = internvl_inputs()
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        internvl(**inputs, vision_feature_select_strategy="full")
    # A 40x40 image: the tower interpolates its positions to 10x10 patches, which is not the 8x8 grid; refused.
    with pytest.raises(ValueError, match=r"100 patch scores, not the 64 of the tiles' patch grids \(8x8\)"):
        internvl(input_ids=inputs["input_ids"][1:], pixel_values=torch.randn(1, 3, 40, 40))


def test_internvl_other_downsample_ratio_is_refused():
    config = transformers.InternVLConfig(
        vision_config=vit(32, num_hidden_layers=2), text_config=_text(model_type="qwen2"), image_token_id=IMAGE,
        downsample_ratio=0.25)
    model = transformers.InternVLForConditionalGeneration(config)
    with pytest.raises(NotImplementedError, match="downsample_ratio"):
        hiprune_ops.apply_hiprune(model)
    assert not capture._installed


REFUSED = {  # test id -> (family named in the error, a word of its reason, tiny model builder)
    "idefics2": ("Idefics2ForConditionalGeneration", "perceiver resampler",
                 lambda: transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config(
                     vision_config=vit(32, num_hidden_layers=2), text_config=_text(model_type="llama"),
                     image_token_id=IMAGE,
                     perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1,
                                           resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1)))),
    "mllama": ("MllamaForConditionalGeneration", "cross-attention",
               lambda: transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                      attention_heads=4, image_size=16, patch_size=4, vision_output_dim=64,
                                      intermediate_layers_indices=[0]),
                   text_config=_text(cross_attention_layers=[1]),
                   image_token_index=IMAGE))),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_families_name_family_and_reason(case):
    family, reason, build = REFUSED[case]
    torch.manual_seed(22)
    model = build()
    with pytest.raises(NotImplementedError, match=rf"refused, {family}: .*{reason}"):
        hiprune_ops.apply_hiprune(model, budget=4)
    assert "_hiprune_state" not in model.__dict__ and "forward" not in model.__dict__
    assert not capture._installed
