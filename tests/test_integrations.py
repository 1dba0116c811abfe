"""apply_hiprune / remove_hiprune / encode on tiny random transformers models (built offline from configs)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import hiprune_ops  # noqa: E402
from hiprune_ops import integrations  # noqa: E402
from hiprune_ops.integrations import capture  # noqa: E402
from hf_testing import (TEXT, assert_full_budget_is_identity, assert_generate_returns_prompt_then_greedy,  # noqa: E402
                        assert_remove_restores_bit_identical_outputs, left_pad, spied_forward, unpatch, vit)

IMAGE = 127  # image placeholder id of the tiny LLaVA models
N = 64  # 8x8 patch grid of the tiny LLaVA tower


def _llama():
    return transformers.LlamaConfig(**dict(TEXT, vocab_size=128))


def _clip(image_size=56):
    return transformers.CLIPVisionConfig(**vit(image_size, num_hidden_layers=4, patch_size=7, projection_dim=32))


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_id=IMAGE,
                                      attn_implementation="sdpa")
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(1)
    config = transformers.LlavaNextConfig(vision_config=_clip(28), text_config=_llama(), image_token_id=IMAGE,
                                          image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                                          attn_implementation="sdpa")
    return transformers.LlavaNextForConditionalGeneration(config).eval()


QWEN_IMAGE, QWEN_START, QWEN_END = 151, 150, 153


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(2)
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}),
        image_token_id=QWEN_IMAGE, video_token_id=152, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, attn_implementation="sdpa")
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


MODELS = ("llava", "llava_next", "qwen")


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    unpatch(*(request.getfixturevalue(name) for name in MODELS if name in request.fixturenames))


def llava_inputs(seed=0):
    """Batch of 2 prompts, left padded: row 0 holds two images, row 1 one image."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5] + [IMAGE] * N + [6, 7] + [IMAGE] * N + [8], [1, 9, 10] + [IMAGE] * N + [11]]
    ids, mask = left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 56, 56, generator=g))


def qwen_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 8, 8], [1, 8, 12], [1, 12, 8]])
    per = (grids.prod(-1) // 4).tolist()
    rows = [[1, 5, QWEN_START] + [QWEN_IMAGE] * per[0] + [QWEN_END, QWEN_START] + [QWEN_IMAGE] * per[1]
            + [QWEN_END, 7], [1, QWEN_START] + [QWEN_IMAGE] * per[2] + [QWEN_END, 8, 9]]
    ids, mask = left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=grids,
                mm_token_type_ids=(ids == QWEN_IMAGE).int(),
                pixel_values=torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g))


def next_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[28, 50], [50, 50]])
    pixel_values = torch.randn(2, 5, 3, 28, 28, generator=g)
    with torch.no_grad():
        counts = [f.shape[0] for f in
                  model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output]
    ids, mask = left_pad([[1, 5] + [IMAGE] * counts[0] + [7, 8], [1, 6] + [IMAGE] * counts[1] + [9]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes)


def _model_and_inputs(request, name):
    model = request.getfixturevalue(name)
    inputs = next_inputs(model) if name == "llava_next" else {"llava": llava_inputs, "qwen": qwen_inputs}[name]()
    return model, inputs


def _full_budget(name):
    return {"llava": N, "llava_next": 5 * 16, "qwen": 10_000}[name]


@pytest.mark.parametrize("name", MODELS)
def test_full_budget_is_identity(request, name):
    model, inputs = _model_and_inputs(request, name)
    assert_full_budget_is_identity(model, inputs, _full_budget(name))


@pytest.mark.parametrize("name,budget", [("llava", 20), ("llava_next", 20), ("qwen", 5)])
def test_prefill_gets_exactly_the_kept_tokens(request, name, budget):
    model, inputs = _model_and_inputs(request, name)
    image_id = model.config.image_token_id
    hiprune_ops.apply_hiprune(model, budget=budget)
    output, (spy, outer) = spied_forward(model, inputs, model.model.language_model, model.model)
    logits = output.logits
    state = integrations.hiprune_state(model)
    images = state.last
    embeds = spy.calls[0]["inputs_embeds"]
    removed = [full - f.shape[0] for full, f in zip(images.full_counts, images.features)]
    original_tokens = inputs["attention_mask"].sum(1)
    n_images = [int(c) for c in ((inputs["input_ids"] == image_id).sum(1))]
    # Each row loses exactly its images' pruned tokens; the padded width follows the longest row.
    per_row, start = [], 0
    for row_tokens in n_images:
        taken, count = 0, 0
        while taken < row_tokens:
            taken += images.full_counts[start + count]
            count += 1
        per_row.append(sum(removed[start:start + count]))
        start += count
    expected = [int(t) - r for t, r in zip(original_tokens, per_row)]
    assert embeds.shape[1] == max(expected) == logits.shape[1]
    for feature, indices in zip(images.features, images.indices):
        if name in ("llava", "qwen"):
            assert feature.shape[0] == budget
        else:  # LLaVA-NeXT: budget // tiles per tile, over the base image and every tile
            assert indices.shape[1] == budget // indices.shape[0] and feature.shape[0] == indices.numel()
    mask = spy.calls[0]["attention_mask"]
    assert [int(m) for m in mask.sum(1)] == expected
    # The image rows of the prefill are the kept features, in order (shrunk input_ids say where they are).
    shrunk_ids = outer.calls[0]["input_ids"]
    torch.testing.assert_close(embeds[shrunk_ids == image_id], torch.cat(images.features), atol=0, rtol=0)


def test_llava_prefill_rows_are_projected_kept_features(llava):
    inputs = llava_inputs(3)
    hiprune_ops.apply_hiprune(llava, budget=12)
    _, (spy,) = spied_forward(llava, inputs, llava.model.language_model)
    embeds, mask = spy.calls[0]["inputs_embeds"], spy.calls[0]["attention_mask"]
    state = integrations.hiprune_state(llava).last
    # Recompute independently: unpatched tower, hidden_states[-2] without CLS, gathered, projected.
    with torch.no_grad():
        hidden = llava.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = torch.stack([llava.model.multi_modal_projector(h[i]) for h, i in zip(hidden, state.indices)])
    assert embeds.shape[1] == int(mask.sum(1).max())
    # Row 0 has two images, row 1 one: 2 * 12 + 5 text tokens and 12 + 4 text tokens (+ left padding).
    assert [int(m) for m in mask.sum(1)] == [2 * 12 + 5, 12 + 4]
    flat_image_rows = embeds[0, -(2 * 12 + 5):][[2 + i for i in range(12)] + [16 + i for i in range(12)]]
    torch.testing.assert_close(flat_image_rows, torch.cat([expected[0], expected[1]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[1, -16:][3:15], expected[2], atol=1e-5, rtol=1e-5)
    # Each image was pruned on its own grid: the same selection as encoding it alone.
    for image, indices in enumerate(state.indices):
        alone = hiprune_ops.encode(llava.model.vision_tower, inputs["pixel_values"][image:image + 1], 12,
                                   object_layer=2, deep_layer=3)
        assert torch.equal(alone.indices[0], indices)


def test_llava_with_siglip_tower_full_strategy():
    torch.manual_seed(10)
    config = transformers.LlavaConfig(vision_config=transformers.SiglipVisionConfig(**vit(32)), text_config=_llama(),
                                      image_token_id=IMAGE, vision_feature_select_strategy="full",
                                      vision_feature_layer=-1, attn_implementation="sdpa")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(10)
    inputs = dict(input_ids=torch.tensor([[1, 4] + [IMAGE] * 64 + [5]]),
                  pixel_values=torch.randn(1, 3, 32, 32, generator=g))
    with torch.no_grad():
        reference = model(**inputs).logits
        try:
            hiprune_ops.apply_hiprune(model, budget=64)
            torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=0)
            hiprune_ops.remove_hiprune(model)
            hiprune_ops.apply_hiprune(model, budget=10)
            assert model(**inputs).logits.shape[1] == 2 + 10 + 1
            assert integrations.hiprune_state(model).deep_layer == 3  # vision_feature_layer -1 -> the last layer
        finally:
            hiprune_ops.remove_hiprune(model)


def test_qwen_kept_tokens_keep_their_mrope_positions(qwen):
    inputs = qwen_inputs(4)
    with torch.no_grad():
        full_positions, _ = qwen.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      image_grid_thw=inputs["image_grid_thw"],
                                                      attention_mask=inputs["attention_mask"])
    hiprune_ops.apply_hiprune(qwen, ratio=0.25)
    _, (spy,) = spied_forward(qwen, inputs, qwen.model.language_model)
    positions = spy.calls[0]["position_ids"]  # (3, B, S')
    state = integrations.hiprune_state(qwen).last
    # Row 0: images 0 and 1. Their kept tokens' positions are the original positions at the kept indices.
    ids = inputs["input_ids"][0]
    run0 = (ids == QWEN_IMAGE).nonzero().flatten()
    first, second = run0[:state.full_counts[0]], run0[state.full_counts[0]:]
    expected = torch.cat([full_positions[:, 0, first[state.kept_slots[0]]],
                          full_positions[:, 0, second[state.kept_slots[1]]]], dim=1)
    mask = spy.calls[0]["attention_mask"][0].bool()
    row = positions[:, 0, mask]
    k0, k1 = len(state.kept_slots[0]), len(state.kept_slots[1])
    image_cols = torch.tensor([3 + i for i in range(k0)] + [3 + k0 + 2 + i for i in range(k1)])
    assert torch.equal(row[:, image_cols], expected)
    # The text after the images keeps its original position too (the last token).
    assert torch.equal(row[:, -1], full_positions[:, 0, -1])


@pytest.mark.parametrize("name,budget", [("llava", 16), ("llava_next", 30), ("qwen", 6)])
def test_generate_batch_several_images(request, name, budget):
    model, inputs = _model_and_inputs(request, name)
    hiprune_ops.apply_hiprune(model, budget=budget)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert_generate_returns_prompt_then_greedy(model, inputs, out, 4)


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_bit_identical_outputs(request, name):
    model, inputs = _model_and_inputs(request, name)
    assert_remove_restores_bit_identical_outputs(model, inputs, budget=8)


def test_attention_implementation_kept_and_no_eager(llava, monkeypatch):
    from transformers.models.clip import modeling_clip
    from transformers.models.llama import modeling_llama

    def forbidden(*args, **kwargs):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(modeling_clip, "eager_attention_forward", forbidden)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", forbidden)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    hiprune_ops.apply_hiprune(llava, budget=10)
    with torch.no_grad():
        llava(**llava_inputs())
    assert llava.config.vision_config._attn_implementation == "sdpa"
    vision_calls = [s for s in calls if s[-2] == N + 1]
    # Layer 1 ran SDPA; the captured layers 2 and 3 ran SDPA's own flash kernel directly, for its lse
    # (test_captured_sdpa_layers_reuse_the_flash_lse_and_keep_their_output); layer 4, after the layer LLaVA feeds
    # its projector (vision_feature_layer -2), did not run.
    assert len(vision_calls) == 1


def test_captured_scores_match_eager_attention_maps():
    torch.manual_seed(5)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        result = hiprune_ops.encode(tower, pixels, 20, object_layer=2, deep_layer=3)
        tower.set_attn_implementation("eager")
        maps = tower(pixels, output_attentions=True, output_hidden_states=True)
        tower.set_attn_implementation("sdpa")
    obj = hiprune_ops.attention_scores(maps.attentions[1], 1)
    deep = hiprune_ops.attention_scores(maps.attentions[2], 1)
    indices, roles = hiprune_ops.select_with_roles(obj, deep, 20, 8, 8)
    assert torch.equal(result.indices, indices) and torch.equal(result.roles, roles)
    expected = maps.hidden_states[3][:, 1:].gather(1, indices[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(result.features, expected, atol=1e-5, rtol=1e-5)


def test_encode_siglip_tower_and_tuple_unpacking():
    torch.manual_seed(6)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit(32))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, indices, roles = hiprune_ops.encode(tower, pixels, budget=16)
        plain = tower(pixels).last_hidden_state
    assert features.shape == (2, 16, 32) and indices.shape == roles.shape == (2, 16)
    assert bool((indices.diff(dim=1) > 0).all())
    torch.testing.assert_close(features, plain.gather(1, indices[..., None].expand(-1, -1, 32)))
    assert not capture._installed


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("deep_layer", [2, 3, 4])
def test_encode_runs_no_layer_past_the_deep_one_and_matches_the_full_run(kind, deep_layer):
    torch.manual_seed(8)
    if kind == "clip":
        tower, prefix = transformers.CLIPVisionModel(_clip()).eval(), 1
    else:
        tower, prefix = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit(56, 4, 7))).eval(), 0
    pixels = torch.randn(2, 3, 56, 56)
    layers = integrations.towers.ViTTower(tower).layers
    ran = []
    counter = layers[-1].register_forward_hook(lambda *args: ran.append(1))
    try:
        with torch.no_grad():
            full = tower(pixels, output_hidden_states=True)
            hooks = [dict(layer._forward_hooks) for layer in layers]
            ran.clear()
            result = hiprune_ops.encode(tower, pixels, 20, object_layer=1, deep_layer=deep_layer)
            layers_after = len(ran)
            # A second run of the same tower, here stopped early, is unchanged: no hook or slot left behind.
            again = hiprune_ops.encode(tower, pixels, 20, object_layer=1, deep_layer=deep_layer)
        left_hooks = [dict(layer._forward_hooks) for layer in layers]
    finally:
        counter.remove()
    assert layers_after == (1 if deep_layer == 4 else 0)
    # The last layer's features are last_hidden_state (SigLIP: after its post-layernorm), the others the raw layer
    # output, as before the early stop: bit for bit.
    expected = full.last_hidden_state if deep_layer == 4 else full.hidden_states[deep_layer]
    patches = expected[:, prefix:]
    assert torch.equal(result.features, patches.gather(1, result.indices[..., None].expand(-1, -1, 32)))
    assert all(torch.equal(a, b) for a, b in zip(result, again))
    assert not capture._installed and left_hooks == hooks


def test_llava_feature_layers_come_from_the_full_runs_hidden_states(llava):
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    tower = llava.model.vision_tower
    hiprune_ops.apply_hiprune(llava, budget=20)
    try:
        adapter = integrations.hiprune_state(llava)
        with torch.no_grad():
            full = tower(pixels, output_hidden_states=True).hidden_states
            for layer in (-2, -1, 2, [1, -2], [0, 3]):
                hidden, _, _ = adapter._tower_features(pixels, layer)
                layers = [layer] if isinstance(layer, int) else layer
                assert torch.equal(hidden, torch.cat([full[i] for i in layers], dim=-1)), layer
            for layer in (len(full), -len(full) - 1, [1, -len(full) - 2]):  # past either end: refused, not wrapped
                with pytest.raises(ValueError, match="vision_feature_layer"):
                    adapter._tower_features(pixels, layer)
    finally:
        hiprune_ops.remove_hiprune(llava)


@pytest.mark.parametrize("deep_layer", [None, 3])
def test_compiled_vision_tower_matches_eager(deep_layer):
    torch.manual_seed(7)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    pruned = integrations.HiPruneVisionTower(tower, 24, deep_layer=deep_layer)
    pixels = torch.randn(2, 3, 56, 56)
    try:
        with torch.no_grad():
            eager = pruned(pixels)
            eager_indices = pruned.encode(pixels).indices
            torch._dynamo.reset()
            compiled = torch.compile(pruned, backend="aot_eager")(pixels)
    finally:
        pruned.remove()
    assert compiled.shape == (2, 24, 32)
    torch.testing.assert_close(compiled, eager)
    full = tower(pixels, output_hidden_states=True)
    reference = (full.last_hidden_state if deep_layer is None else full.hidden_states[deep_layer])[:, 1:]
    torch.testing.assert_close(compiled, reference.gather(1, eager_indices[..., None].expand(-1, -1, 32)))
    assert not capture._installed


def test_unsupported_model_lists_supported():
    model = transformers.LlamaForCausalLM(_llama())
    with pytest.raises(TypeError) as error:
        hiprune_ops.apply_hiprune(model)
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration"):
        assert name in str(error.value)
    tower = transformers.CLIPVisionModel(_clip())
    with pytest.raises(TypeError, match="encode"):
        hiprune_ops.apply_hiprune(tower)
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        hiprune_ops.encode(model, torch.zeros(1, 3, 56, 56), 4)


def test_bad_arguments_name_themselves(llava):
    with pytest.raises(ValueError, match="budget"):
        hiprune_ops.apply_hiprune(llava, budget=N + 1)
    with pytest.raises(ValueError, match="object_layer"):
        hiprune_ops.apply_hiprune(llava, budget=8, object_layer=5)
    with pytest.raises(ValueError, match="alpha"):
        hiprune_ops.apply_hiprune(llava, budget=8, alpha=1.5)
    with pytest.raises(ValueError, match="ratio"):
        hiprune_ops.apply_hiprune(llava, ratio=0.0)
    with pytest.raises(ValueError, match="video_budget"):
        hiprune_ops.apply_hiprune(llava, video_budget=8)
    assert "_hiprune_state" not in llava.__dict__ and not capture._installed
    hiprune_ops.apply_hiprune(llava, budget=8)
    with pytest.raises(RuntimeError, match="already patched"):
        hiprune_ops.apply_hiprune(llava, budget=8)


def test_default_layers_scale_with_depth(llava, qwen):
    hiprune_ops.apply_hiprune(llava)
    state = integrations.hiprune_state(llava)
    # 4-layer tower: object round(4 * 9 / 24) = 2, deep = the layer feeding the projector (-2 -> 3); 64 / 3 -> 21.
    assert (state.object_layer, state.deep_layer, state.per_image) == (2, 3, 21)
    hiprune_ops.apply_hiprune(qwen)
    state = integrations.hiprune_state(qwen)
    assert (state.object_layer, state.deep_layer) == (2, 4)  # full-attention block nearest depth / 2, the last


def test_eager_tower_is_captured_too_and_agrees_with_sdpa():
    torch.manual_seed(8)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        sdpa = hiprune_ops.encode(tower, pixels, 12)
        tower.set_attn_implementation("eager")
        eager = hiprune_ops.encode(tower, pixels, 12)
    assert tower.config._attn_implementation == "eager"
    assert torch.equal(sdpa.indices, eager.indices) and torch.equal(sdpa.roles, eager.roles)
    torch.testing.assert_close(sdpa.features, eager.features, atol=1e-5, rtol=1e-5)
    assert not capture._installed


def test_packed_flash_layout_scores_each_segment():
    # The flash path hands the kernel (1, H, T, D) with cu_seq_lens_q; scores must stay inside each segment.
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    slot = capture.ScoreSlot()
    slot.record(q, k, None, {"scaling": 0.3, "cu_seq_lens_q": torch.tensor([0, 4, 10])})
    per_segment = torch.cat([hiprune_ops.qk_scores(q[..., a:b, :], k[..., a:b, :], 0.3)[0]
                             for a, b in ((0, 4), (4, 10))])
    torch.testing.assert_close(slot.scores[0], per_segment)
    # A mask that hides more than padded keys (here: causal) cannot be scored (key-padding masks can: capture.py).
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None]
    with pytest.raises(NotImplementedError, match="mask"):
        slot.record(q, k, causal, {})


def _tiny_llava_processor():
    """A real LlavaProcessor built offline: CLIP image processor + a word-level tokenizer with an <image> token."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE}
    vocab.update({w: 4 + i for i, w in enumerate("user : describe the picture please what is this".split())})
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left")
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    image_processor = image_processor_class(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_generate_with_processor_output_unchanged(llava):
    processor = _tiny_llava_processor()
    rng = torch.Generator().manual_seed(11)
    images = [torch.randint(0, 255, (60, 70, 3), generator=rng, dtype=torch.uint8).numpy() for _ in range(3)]
    inputs = processor(images=images, text=["user : <image> describe <image> please", "user : <image> what is this"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        hiprune_ops.apply_hiprune(llava, budget=N)
        assert torch.equal(llava.generate(**inputs, max_new_tokens=3, do_sample=False), reference)
        hiprune_ops.remove_hiprune(llava)
        hiprune_ops.apply_hiprune(llava, budget=9)
        out = llava.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prompt = inputs["input_ids"]
    assert torch.equal(out[:, :prompt.shape[1]], prompt) and out.shape[1] == prompt.shape[1] + 3
    assert len(processor.batch_decode(out[:, prompt.shape[1]:])) == 2


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
])
def test_captured_sdpa_layers_reuse_the_flash_lse_and_keep_their_output(monkeypatch, device, dtype):
    # A captured SDPA layer runs SDPA's own flash kernel, which returns each row's lse, and scores in one pass.
    torch.manual_seed(12)
    tower = transformers.CLIPVisionModel(_clip()).eval().to(device, dtype)
    pixels = torch.randn(2, 3, 56, 56).to(device, dtype)
    with torch.no_grad():
        plain = tower(pixels, output_hidden_states=True).hidden_states
    lse_given = []
    real_qk_scores = hiprune_ops.ops.qk_scores

    def spying_qk_scores(q, k, scale, num_prefix=0, cu_seqlens=None, lse=None, **kwargs):
        lse_given.append(lse)
        return real_qk_scores(q, k, scale, num_prefix, cu_seqlens, lse, **kwargs)

    monkeypatch.setattr(capture.ops, "qk_scores", spying_qk_scores)
    layers = tower.encoder.layers
    slots = [capture.attach(layers[i].self_attn, num_prefix=1) for i in (1, 2)]
    try:
        with torch.no_grad():
            captured = tower(pixels, output_hidden_states=True).hidden_states
    finally:
        for i in (1, 2):
            capture.detach(layers[i].self_attn)
    assert len(lse_given) == 2 and all(lse is not None and lse.shape == (2, 4, N + 1) for lse in lse_given)
    for got, want in zip(captured, plain):  # every layer's output, tapped or not, is SDPA's bit for bit
        assert torch.equal(got, want)
    assert all(slot.scores[0].shape == (2, N) for slot in slots)
    # The scores equal the two-pass ones from the same q and k (the layer's own attention maps, reduced).
    with torch.no_grad():
        tower.set_attn_implementation("eager")
        maps = tower(pixels, output_attentions=True).attentions
        tower.set_attn_implementation("sdpa")
    for slot, i in zip(slots, (1, 2)):
        torch.testing.assert_close(slot.scores[0], hiprune_ops.attention_scores(maps[i], 1),
                                   rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-7)


def test_sdpa_capture_falls_back_to_two_passes_with_a_mask(monkeypatch):
    # A mask takes SDPA off the flash kernel: the shortcut is not taken, the original SDPA call runs.
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    assert capture._sdpa_flash_with_lse(module, q, k, v, torch.zeros(1, 1, 9, 9), (), {}) is None
    assert capture._sdpa_flash_with_lse(module, q, k, v, None, (), {"dropout": 0.1}) is None
    assert capture._sdpa_flash_with_lse(module, q, k, v, None, (), {"position_bias": torch.zeros(1)}) is None
    module.is_causal = True
    assert capture._sdpa_flash_with_lse(module, q, k, v, None, (), {}) is None
    output, lse = capture._sdpa_flash_with_lse(module, q, k, v, None, (), {"is_causal": False, "scaling": 0.3})
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    assert torch.equal(output, want)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.mT * 0.3, dim=-1))


# -- the framework-neutral layer: one rule set, one selection step, one capture interface ---------------------------
from hiprune_ops.integrations import families, selection, settings  # noqa: E402
from hiprune_ops.integrations.vllm.scores import TowerTaps  # noqa: E402
from hiprune_ops.integrations.vllm.settings import HiPruneSettings  # noqa: E402

# (budget, ratio, n, clamp) -> kept count, or (exception, words of its message). One table for every entry point.
RULES = [
    ((0, None, 64, False), 64),                        # 0: off
    ((None, 1.0, 64, False), 64),                      # ratio 1.0: off
    ((5, None, 64, False), 5),
    ((None, 0.25, 64, False), 16),
    ((None, 0.001, 64, False), 1),                     # at least one token
    ((65, None, 64, False), (ValueError, "budget must be in [0, 64]")),   # one item size: refused
    ((65, None, 64, True), 64),                        # items differ in size: clamped
    ((-1, None, 64, False), (ValueError, "budget must be an int >= 0")),
    ((None, 0.0, 64, False), (ValueError, "ratio must be a number in (0, 1]")),
    ((None, 1.5, 64, False), (ValueError, "ratio must be a number in (0, 1]")),
    ((4, 0.5, 64, False), (ValueError, "give budget or ratio, not both")),
    ((2.5, None, 64, False), (settings.SettingTypeError, "budget must be an int")),
    ((True, None, 64, False), (settings.SettingTypeError, "budget must be an int")),
    ((None, "0.5", 64, False), (settings.SettingTypeError, "ratio must be a number")),
]


def _outcome(call):
    try:
        return call()
    except ValueError as error:  # SettingTypeError is one too
        return type(error), str(error)


def _same(outcome, expected):
    if isinstance(expected, int):
        return outcome == expected
    kind, words = expected
    return isinstance(outcome, tuple) and outcome[0] is kind and words in outcome[1]


@pytest.mark.parametrize("values,expected", RULES)
def test_one_rule_set_for_every_entry_point(values, expected):
    budget, ratio, n, clamp = values
    grid = int(n ** 0.5)
    # The resolver itself, and vLLM's server default.
    assert _same(_outcome(lambda: settings.keep_count(budget, ratio, n, 1 / 3, clamp=clamp)), expected)
    server = lambda: HiPruneSettings(enabled=True, budget=budget, ratio=ratio).keep_count(n, clamp=clamp)  # noqa
    assert _same(_outcome(server), expected)
    # vLLM's per-request values: the same outcome, the request's key names in the error.
    request = {k: v for k, v in (("hiprune_budget", budget), ("hiprune_ratio", ratio)) if v is not None}
    outcome = _outcome(lambda: HiPruneSettings().for_request(request).keep_count(n, clamp=clamp))
    if isinstance(expected, int):
        assert outcome == expected
    else:
        words = expected[1].replace("budget", "hiprune_budget").replace("ratio", "hiprune_ratio")
        assert outcome[0] is expected[0] and outcome[1].startswith("mm_processor_kwargs: "), outcome
        assert words in outcome[1], outcome
    if clamp:
        return
    # encode and HiPruneVisionTower on a tower of n patches (one size: above n is refused).
    torch.manual_seed(0)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    assert tower.config.image_size // tower.config.patch_size == grid
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        encoded = _outcome(lambda: hiprune_ops.encode(tower, pixels, budget, ratio=ratio).indices.shape[1])
    assert _same(encoded, expected), encoded
    assert not capture._installed
    wrapped = _outcome(lambda: integrations.HiPruneVisionTower(tower, budget, ratio=ratio).remove() and 0)
    assert isinstance(expected, int) or _same(wrapped, expected)
    assert not capture._installed


@pytest.mark.parametrize("values,expected", [r for r in RULES if not r[0][3]])
def test_apply_hiprune_follows_the_rule_set(llava, values, expected):
    budget, ratio, n, _ = values
    assert n == N
    outcome = _outcome(lambda: hiprune_ops.apply_hiprune(llava, budget, ratio) and
                       integrations.hiprune_state(llava).per_image)
    hiprune_ops.remove_hiprune(llava)
    assert _same(outcome, expected), outcome
    assert not capture._installed


def test_budget_0_and_ratio_1_keep_every_token_end_to_end(llava, qwen):
    for name, model, inputs in (("llava", llava, llava_inputs()), ("qwen", qwen, qwen_inputs())):
        with torch.no_grad():
            plain = model(**inputs).logits
        for off in ({"budget": 0}, {"ratio": 1.0}):
            hiprune_ops.apply_hiprune(model, **off)
            try:
                with torch.no_grad():
                    pruned = model(**inputs).logits
            finally:
                hiprune_ops.remove_hiprune(model)
            torch.testing.assert_close(pruned, plain, atol=1e-5, rtol=1e-5, msg=f"{name} {off}")


@pytest.mark.parametrize("argument,value", [("alpha", "0.1"), ("object_layer", 1.0), ("deep_layer", "2"),
                                            ("official", 1), ("neighborhood", 5), ("video_budget", 2.5)])
def test_bad_types_name_the_argument_everywhere(qwen, argument, value):
    with pytest.raises(TypeError, match=argument):
        hiprune_ops.apply_hiprune(qwen, **{argument: value})
    assert integrations.hiprune_state(qwen) is None and not capture._installed
    if argument != "video_budget":
        tower = transformers.CLIPVisionModel(_clip()).eval()
        with pytest.raises(TypeError, match=argument):
            hiprune_ops.encode(tower, torch.zeros(1, 3, 56, 56), 4, **{argument: value})
        with pytest.raises(ValueError, match=argument):  # vLLM: a bad server default fails engine start
            HiPruneSettings(enabled=True, **{argument: value}).validate()


def test_request_keys_map_to_settings_fields_one_line_each():
    # A request key is one entry of settings.REQUEST_KEYS; each names a field of PruneSettings.
    assert set(settings.REQUEST_KEYS.values()) <= set(settings.SETTING_FIELDS)
    updated = HiPruneSettings(enabled=True, budget=64, alpha=0.2).for_request({"hiprune_ratio": 0.5})
    assert (updated.budget, updated.ratio, updated.alpha) == (None, 0.5, 0.2)


def test_selection_step_batches_items_without_changing_any_index():
    torch.manual_seed(3)
    grids = [(8, 8), (6, 4), (8, 8), (4, 6), (8, 8)]
    keeps = [10, 5, 10, 7, 64]
    obj = [torch.rand(h * w) for h, w in grids]
    deep = [torch.rand(h * w) for h, w in grids]
    options = settings.PruneSettings()
    indices, roles = selection.select_items(obj, deep, grids, keeps, options)
    for item, ((h, w), keep) in enumerate(zip(grids, keeps)):
        alone, alone_roles = hiprune_ops.select_with_roles(obj[item][None], deep[item][None], keep, h, w)
        assert torch.equal(indices[item], alone[0]) and torch.equal(roles[item], alone_roles[0])
    skipped, _ = selection.select_items(obj, deep, grids, keeps, options, skip_full=True)
    assert skipped[4] is None and torch.equal(skipped[0], indices[0])
    # merge k: the scores are averaged over k x k groups first, as the features are.
    merged, _ = selection.select_items(obj[:1], deep[:1], [(8, 8)], [5], options, merge=2)
    pooled = [torch.nn.functional.avg_pool2d(s.reshape(1, 1, 8, 8), 2).flatten(1) for s in (obj[0], deep[0])]
    assert torch.equal(merged[0], hiprune_ops.select(pooled[0], pooled[1], 5, 4, 4)[0])
    with pytest.raises(ValueError, match="kept counts"):
        selection.select_items(obj, deep, grids, keeps[:2], options)


def test_qwen2_5_vl_default_object_layer_is_declared_once(qwen):
    # The transformers adapter reads families.QWEN2_5_VL, as the vLLM binding does (same function, same config).
    hiprune_ops.apply_hiprune(qwen)
    state = integrations.hiprune_state(qwen)
    vision = qwen.config.vision_config
    assert state.geometry is families.QWEN2_5_VL
    assert state.object_layer == families.QWEN2_5_VL.object_layer(vision.depth, vision) == 2
    assert families.full_attention_nearest_middle(32, [7, 15, 23, 31]) == 16
    assert families.full_attention_nearest_middle(4, []) == 4


def test_both_captures_implement_the_capture_interface():
    torch.manual_seed(4)
    tower = transformers.CLIPVisionModel(_clip()).eval()
    slots = integrations.towers.ViTTower(tower).capture(2, 4).attach()
    taps = TowerTaps([torch.nn.Identity()], total_heads=1, all_reduce=None)
    try:
        for implementation in (slots, taps):
            assert isinstance(implementation, capture.LayerScores)
        with pytest.raises(RuntimeError, match="boom"):  # scored() disarms also when the tower fails
            slots.scored(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        assert all(not capture.slot_of(m).scores for m in slots.modules)
        with torch.no_grad():
            _, (obj, deep) = slots.scored(lambda: tower(torch.randn(1, 3, 56, 56)))
        assert obj.shape == deep.shape == (1, N)
    finally:
        slots.detach()
        taps.taps[0].remove()
    assert not capture._installed
