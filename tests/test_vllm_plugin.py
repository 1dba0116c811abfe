"""Tier 1 of the vLLM plugin: what it computes without vLLM (vLLM itself runs in `make test-vllm`)."""

import subprocess
import sys

import pytest
import torch

import hiprune_ops
from hiprune_ops.integrations.qwen_positions import (MediaItem, kept_grid_offsets, merged_raster_scores,
                                                     mrope_positions)
from hiprune_ops.integrations.vllm.scores import (QKTap, finish_scores, head_sums, pack_scores, score_channels,
                                                  unpack_scores)
from hiprune_ops.integrations.vllm.settings import HiPruneSettings


# -- placeholder count == what select returns ----------------------------------------------------------------------
@pytest.mark.parametrize("model,grids,configs,clamp", [
    ("llava", [(24, 24)], [{"budget": 192}, {"budget": 128}, {"budget": 64}, {"ratio": 1 / 3}], False),
    ("qwen", [(18, 26), (7, 5), (1, 3)], [{"ratio": 0.334}, {"ratio": 0.223}, {"ratio": 0.112}, {"budget": 64}],
     True),
])
def test_placeholder_count_is_select_length(model, grids, configs, clamp):
    torch.manual_seed(0)
    requests = [{}, {"hiprune_budget": 5}, {"hiprune_ratio": 0.5}, {"hiprune_budget": 0}, {"hiprune_ratio": 1.0}]
    for config in configs:
        server = HiPruneSettings(enabled=True, **config)
        for request in requests:
            settings = server.for_request(request)
            for grid_h, grid_w in grids:
                n = grid_h * grid_w
                count = settings.keep_count(n, clamp=clamp)  # what the processor writes into the prompt
                budget = request.get("hiprune_budget", None if "hiprune_ratio" in request else config.get("budget"))
                keeps_all = budget == 0 or request.get("hiprune_ratio") == 1.0 or (budget or 0) >= n
                assert (count == n) == keeps_all or (budget is None and count == n)
                if count == n:  # the encoder returns every token, no selection
                    continue
                obj, deep = torch.rand(1, n), torch.rand(1, n)
                indices = hiprune_ops.select(obj, deep, count, grid_h, grid_w)  # what the encoder keeps
                assert indices.shape == (1, count)


def test_settings_from_config_env_and_off():
    class Config:
        pass

    assert not HiPruneSettings.from_hf_config(Config(), environ={}).enabled
    env = HiPruneSettings.from_hf_config(Config(), environ={"HIPRUNE_BUDGET": "64"})
    assert env.enabled and env.keep_count(576) == 64
    config = Config()
    config.hiprune = {"ratio": 0.25, "alpha": 0.2, "neighborhood": "square"}
    settings = HiPruneSettings.from_hf_config(config, environ={"HIPRUNE_BUDGET": "64"})  # the config wins
    assert settings.keep_count(576) == 144 and settings.alpha == 0.2 and settings.neighborhood == "square"
    # A request on a server without a default switches pruning on for itself only.
    assert HiPruneSettings().for_request({"hiprune_budget": 10}).keep_count(576) == 10
    assert HiPruneSettings().keep_count(576) == 576
    # HiPrune++ per request: the request's prompt_beta replaces the default's; the budget stays.
    server = HiPruneSettings(enabled=True, budget=64, prompt_beta=0.1)
    assert server.for_request({"hiprune_prompt_beta": 0.25}).prompt_beta == 0.25
    assert server.for_request({"hiprune_prompt_beta": 0}).prompt_beta == 0
    assert server.for_request({"hiprune_prompt_beta": 0.25}).keep_count(576) == 64
    assert server.for_request({}).prompt_beta == 0.1


@pytest.mark.parametrize("request_kwargs,match", [
    ({"hiprune_budget": -1}, "hiprune_budget"),
    ({"hiprune_budget": "64"}, "hiprune_budget"),
    ({"hiprune_budget": 1.5}, "hiprune_budget"),
    ({"hiprune_ratio": 1.5}, "hiprune_ratio"),
    ({"hiprune_ratio": 0}, "hiprune_ratio"),
    ({"hiprune_budget": 4, "hiprune_ratio": 0.5}, "not both"),
    ({"hiprune_budgte": 64}, r"unknown hiprune key\(s\) hiprune_budgte; known keys: hiprune_budget, hiprune_ratio"),
    ({"hiprune_alpha": 0.2, "hiprune_budget": 8}, "hiprune_alpha"),
    ({"hiprune_prompt_beta": 1.5}, r"mm_processor_kwargs: hiprune_prompt_beta must be a number in \[0, 1\]"),
    ({"hiprune_prompt_beta": -0.1}, "hiprune_prompt_beta must be"),
    ({"hiprune_prompt_beta": "0.1"}, "hiprune_prompt_beta must be"),
    ({"hiprune_prompt_beta": float("nan")}, "hiprune_prompt_beta must be"),
])
def test_bad_request_values_name_themselves(request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiPruneSettings(enabled=True, budget=64).for_request(request_kwargs)


def test_bad_server_config_names_itself():
    class Config:
        pass

    config = Config()
    config.hiprune = {"budgett": 64}
    with pytest.raises(ValueError, match="unknown keys"):
        HiPruneSettings.from_hf_config(config, environ={})
    config.hiprune = {"budget": 64, "alpha": 2.0}
    with pytest.raises(ValueError, match="alpha"):
        HiPruneSettings.from_hf_config(config, environ={})
    config.hiprune = {"budget": 64, "prompt_beta": 0.1}  # HiPrune++: the bindings that cover it read it
    assert HiPruneSettings.from_hf_config(config, environ={}).prompt_beta == 0.1
    for value, error in ((1.5, ValueError), (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)):
        config.hiprune = {"budget": 64, "prompt_beta": value}
        with pytest.raises(error, match="hiprune: prompt_beta must be a number in"):
            HiPruneSettings.from_hf_config(config, environ={})
    config.hiprune = {"budget": 64, "prompt_beta": 0}
    assert HiPruneSettings.from_hf_config(config, environ={}).budget == 64
    config.hiprune = 64
    with pytest.raises(TypeError, match="dict"):
        HiPruneSettings.from_hf_config(config, environ={})
    with pytest.raises(ValueError, match="HIPRUNE_BUDGET"):
        HiPruneSettings.from_hf_config(Config(), environ={"HIPRUNE_BUDGET": "many"})
    with pytest.raises(ValueError, match="budget must be in"):
        HiPruneSettings(enabled=True, budget=600).keep_count(576)  # LLaVA: a budget above the grid is an error
    assert HiPruneSettings(enabled=True, budget=600).keep_count(576, clamp=True) == 576


# -- video slices: video_budget / video_ratio, server and request ----------------------------------------------------
def test_video_settings_default_to_the_image_setting():
    class Config:
        pass

    config = Config()
    config.hiprune = {"ratio": 0.25, "video_budget": 5}
    server = HiPruneSettings.from_hf_config(config, environ={})
    assert server.keep_count(24, clamp=True) == 6 and server.keep_count(24, clamp=True, kind="video") == 5
    assert server.keep_count(24, clamp=True, kind="video") == 5
    # A budget above a slice keeps it whole (Qwen-style and GLM slices differ in size); 0 / 1.0 keep every token.
    assert server.for_request({"hiprune_video_budget": 99}).keep_count(24, clamp=True, kind="video") == 24
    assert server.for_request({"hiprune_video_budget": 0}).keep_count(24, clamp=True, kind="video") == 24
    assert server.for_request({"hiprune_video_ratio": 1.0}).keep_count(24, clamp=True, kind="video") == 24
    # A request's video value replaces the server's video pair, not the image setting.
    request = server.for_request({"hiprune_video_ratio": 0.5})
    assert request.keep_count(24, clamp=True, kind="video") == 12 and request.keep_count(24, clamp=True) == 6
    # Without a video setting, a video slice takes the image setting, the server's or the request's.
    image_only = HiPruneSettings(enabled=True, budget=7)
    assert image_only.keep_count(24, clamp=True, kind="video") == 7
    assert image_only.for_request({"hiprune_budget": 3}).keep_count(24, clamp=True, kind="video") == 3
    assert HiPruneSettings().for_request({"hiprune_video_budget": 4}).keep_count(24, clamp=True, kind="video") == 4
    assert HiPruneSettings().for_request({"hiprune_video_budget": 4}).keep_count(24, clamp=True) == 24
    assert HiPruneSettings(enabled=True).keep_count(24, clamp=True, default_ratio=0.334, kind="video") == 8


@pytest.mark.parametrize("request_kwargs,match", [
    ({"hiprune_video_budget": -1}, "hiprune_video_budget"),
    ({"hiprune_video_budget": 2.5}, "hiprune_video_budget"),
    ({"hiprune_video_ratio": 1.5}, "hiprune_video_ratio"),
    ({"hiprune_video_budget": 4, "hiprune_video_ratio": 0.5}, "hiprune_video_budget or hiprune_video_ratio"),
    ({"hiprune_video_budgte": 4}, "hiprune_video_budgte"),
])
def test_bad_video_request_values_name_themselves(request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiPruneSettings(enabled=True, budget=64).for_request(request_kwargs)


def test_video_budget_above_a_fixed_size_item_names_the_request_key():
    settings = HiPruneSettings(enabled=True, budget=8).for_request({"hiprune_video_budget": 30})
    with pytest.raises(ValueError, match="mm_processor_kwargs: hiprune_video_budget must be in"):
        settings.keep_count(24, kind="video")
    with pytest.raises(ValueError, match="^hiprune_video_budget|video_budget must be in"):
        HiPruneSettings(enabled=True, video_budget=30).keep_count(24, kind="video")


def test_bad_video_server_values_name_themselves():
    class Config:
        pass

    config = Config()
    for bad, error, match in (({"video_budget": "5"}, TypeError, "video_budget"),
                              ({"video_budget": 5, "video_ratio": 0.5}, ValueError, "video_budget or video_ratio"),
                              ({"video_ratio": 0}, ValueError, "video_ratio")):
        config.hiprune = bad
        with pytest.raises(error, match=match):
            HiPruneSettings.from_hf_config(config, environ={})


def test_video_setting_refused_at_start_where_videos_are_not_pruned():
    from types import SimpleNamespace

    from hiprune_ops.integrations.vllm._common import prepare_vllm_config

    def vllm_config(hiprune):
        hf_config = SimpleNamespace(hiprune=hiprune)
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config),
                               compilation_config=SimpleNamespace())

    with pytest.raises(ValueError, match="video_budget / video_ratio: the vLLM plugin prunes no video of Llava"):
        prepare_vllm_config(vllm_config({"video_ratio": 0.5}), "Llava")
    assert prepare_vllm_config(vllm_config({"video_ratio": 0.5}), "Qwen", video_pruned=True).video_ratio == 0.5
    assert prepare_vllm_config(vllm_config({"ratio": 0.5}), "Llava").ratio == 0.5


# -- M-RoPE of kept tokens -----------------------------------------------------------------------------------------
def _unpruned_positions_transformers(ids, grids):
    """Positions of the unpruned prompt from transformers' own Qwen2.5-VL (the truth)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=16,
                           spatial_merge_size=2),
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=200,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        image_token_id=151, video_token_id=152, vision_start_token_id=150, vision_end_token_id=153)
    model = transformers.Qwen2_5_VLModel(config)
    grid_thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in grids])
    types = (ids == 151).int()
    positions, delta = model.get_rope_index(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid_thw)
    return positions[:, 0], int(delta)


def test_kept_tokens_keep_their_positions_and_text_keeps_its_own():
    torch.manual_seed(3)
    grids, budgets = [(5, 3), (2, 4)], [4, 8]  # the second image keeps everything
    text = [[1, 5, 6, 150], [153, 7, 150], [153, 8, 9]]
    full_ids, pruned_ids, items, kept_sets, kept_offsets = [], [], [], [], []
    for i, (grid_h, grid_w) in enumerate(grids):
        full_ids += text[i]
        pruned_ids += text[i]
        n = grid_h * grid_w
        kept = torch.randperm(n)[:budgets[i]].sort().values
        items.append(MediaItem(len(pruned_ids), 1, grid_h, grid_w, len(kept)))
        kept_sets.append((len(full_ids), kept))
        kept_offsets.append(kept_grid_offsets(kept, grid_h, grid_w))
        full_ids += [151] * n
        pruned_ids += [151] * len(kept)
    full_ids += text[-1]
    pruned_ids += text[-1]
    truth, truth_delta = _unpruned_positions_transformers(torch.tensor(full_ids), grids)
    positions, delta = mrope_positions(len(pruned_ids), items, kept_offsets)
    expected = []
    cursor = 0
    for (start, kept), item in zip(kept_sets, items):
        expected.append(truth[:, cursor:start])  # text before
        expected.append(truth[:, start + kept])  # the kept tokens at their original positions
        cursor = start + item.grid_h * item.grid_w
    expected.append(truth[:, cursor:])
    assert torch.equal(positions, torch.cat(expected, dim=1))
    # Generation continues where the unpruned prompt's would: next position = truth's last + 1.
    assert len(pruned_ids) + delta == len(full_ids) + truth_delta
    # Deferred form (vLLM): origins now, the offsets added once the encoder has chosen.
    deferred, deferred_delta = mrope_positions(len(pruned_ids), items, [None, kept_offsets[1]])
    first = slice(items[0].offset, items[0].offset + items[0].kept)
    assert torch.equal(deferred[:, first] + kept_offsets[0], positions[:, first])
    deferred[:, first] += kept_offsets[0]
    assert torch.equal(deferred, positions) and deferred_delta == delta


def test_mrope_positions_rejects_overlapping_items():
    with pytest.raises(ValueError, match="overlaps"):
        mrope_positions(10, [MediaItem(2, 1, 2, 2, 4), MediaItem(4, 1, 2, 2, 4)])


def test_merged_raster_scores_undo_window_order():
    transformers = pytest.importorskip("transformers")
    from transformers.vision_utils import get_vision_window_index

    grid_thw = torch.tensor([[1, 12, 8], [1, 4, 6]])
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=56, patch_size=14)
    merged = torch.rand(int(grid_thw.prod(-1).sum()) // 4)  # raster-order truth per merged token
    spread = torch.rand(merged.numel(), 4)
    patches = (merged[window_index][:, None] * 4 * spread / spread.sum(1, keepdim=True)).flatten()  # window order
    assert torch.allclose(merged_raster_scores(patches, window_index, 4), merged)
    with pytest.raises(ValueError, match="merge_unit"):
        merged_raster_scores(patches[:-1], window_index, 4)


# -- tensor parallelism: per-rank head sums, one all-reduce ---------------------------------------------------------
@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_head_sums_reduce_to_the_full_scores(ranks):
    torch.manual_seed(ranks)
    batch, heads, length, dim = 2, 8, 50, 32
    q, k = torch.randn(batch, length, heads * dim), torch.randn(batch, length, heads * dim)
    full = hiprune_ops.qk_scores(q.view(batch, length, heads, dim).transpose(1, 2),
                                 k.view(batch, length, heads, dim).transpose(1, 2), dim ** -0.5, 1)
    per = heads // ranks
    partial = [head_sums(q[..., r * per * dim:(r + 1) * per * dim], k[..., r * per * dim:(r + 1) * per * dim],
                         per, per, dim, dim ** -0.5, num_prefix=1) for r in range(ranks)]
    reduced = torch.stack(partial).sum(0)  # what the all-reduce gives every rank
    scores = finish_scores(partial[0], heads, all_reduce=lambda t: reduced)
    assert torch.allclose(scores, full, rtol=1e-5, atol=1e-7)
    deep = torch.rand_like(full)
    assert torch.equal(hiprune_ops.select(scores, deep, 12, 7, 7), hiprune_ops.select(full, deep, 12, 7, 7))


def test_sharded_head_sums_packed_segments():
    torch.manual_seed(5)
    heads, dim, tokens = 4, 32, 40
    cu = torch.tensor([0, 16, 40], dtype=torch.int32)
    q, k = torch.randn(1, tokens, heads, dim), torch.randn(1, tokens, heads, dim)
    full = hiprune_ops.qk_scores(q[0], k[0], 0.2, 0, cu)
    halves = [head_sums(q[:, :, h:h + 2], k[:, :, h:h + 2], 2, 2, dim, 0.2, 0, cu) for h in (0, 2)]
    assert torch.allclose(finish_scores(halves[0] + halves[1], heads), full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_packed_beside_embeddings_come_back_bit_exact(dtype):
    embeddings = torch.randn(10, 6).to(dtype)
    scores = [torch.rand(10) * 1e-3, torch.rand(10)]
    packed = pack_scores(embeddings, scores)
    assert packed.shape == (10, 6 + score_channels(dtype))
    gathered = torch.cat([packed[:4], packed[4:]]).clone()  # any copy, as an all-gather makes
    back, (a, b) = unpack_scores(gathered)
    assert torch.equal(back, embeddings) and torch.equal(a, scores[0]) and torch.equal(b, scores[1])


class _Attention(torch.nn.Module):
    """A stand-in with MMEncoderAttention's attributes, to test our hook (vLLM itself: make test-vllm)."""

    def __init__(self, heads, dim):
        super().__init__()
        self.num_heads = self.num_kv_heads = heads
        self.head_size, self.scale = dim, dim ** -0.5

    def forward(self, query, key, value, cu_seqlens=None):
        return value


def test_tap_records_only_while_armed():
    attention = _Attention(2, 32)
    tap = QKTap(attention, num_prefix=1)
    q, k = torch.randn(3, 17, 64), torch.randn(3, 17, 64)
    attention(q, k, q)
    tap.arm()
    attention(q, k, q)
    sums = tap.take()
    expected = hiprune_ops.qk_scores(q.view(3, 17, 2, 32).transpose(1, 2), k.view(3, 17, 2, 32).transpose(1, 2),
                                     32 ** -0.5, 1) * 2
    assert torch.equal(sums, expected)
    with pytest.raises(RuntimeError, match="was not called"):
        tap.take()
    tap.remove()


# -- lazy import -----------------------------------------------------------------------------------------------------
def test_plugin_import_does_not_import_vllm():
    code = ("import sys, hiprune_ops, hiprune_ops.integrations.vllm as p; "
            "import hiprune_ops.integrations.vllm.settings, hiprune_ops.integrations.vllm.scores; "
            "assert callable(p.register); print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
