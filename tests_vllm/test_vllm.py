"""Tier 2 of the vLLM plugin: real vLLM (CPU build), tiny random models built offline (`make test-vllm`).

Engines run in the session's shared processes (conftest.shared_runs, scenario.py): with the plugin (found through
its entry point) or without it (VLLM_PLUGINS=none), in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) or in vLLM's
default multiprocess mode.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_models  # noqa: E402

LLAVA_TOKENS = tiny_models.LLAVA_GRID ** 2                                    # 64 per image
QWEN_GRID = (tiny_models.QWEN_IMAGE_SIZE[0] // 28, tiny_models.QWEN_IMAGE_SIZE[1] // 28)  # 6 x 4 merged
QWEN_TOKENS = QWEN_GRID[0] * QWEN_GRID[1]


def image_tokens(result, token_id):
    return sum(1 for t in result["prompt_ids"] if t == token_id)


REQUESTS = [
    {},                                                    # the server default
    {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},       # off for this request
    {"mm_processor_kwargs": {"hiprune_budget": 5}},        # another budget for this request
    {"mm_processor_kwargs": {"hiprune_budget": -1}},       # refused, the server goes on
    {},                                                    # the default again: the override did not stick
]


SPECS = {"llava": {"hf_overrides": {"hiprune": {"budget": 16}},
                   "requests": REQUESTS + [{"mm_processor_kwargs": {"hiprune_budget": 64}}]},
         "qwen": {"hf_overrides": {"hiprune": {"ratio": 0.25}}, "requests": REQUESTS}}
QWEN_DEFAULT = round(0.25 * QWEN_TOKENS)  # the in-process run's default
# Two-rank engines in vLLM's multiprocess mode, their default from the environment: LLaVA's tower split by heads,
# Qwen2.5-VL's in data-parallel mode.
TWO_RANKS = {"llava": "test_vllm llava, two ranks", "qwen": "test_vllm qwen, two ranks, data-parallel encoder"}
SHARED_ENGINES = {  # conftest.shared_runs
    **scenario.engine_pairs({f"test_vllm {arch}": (arch, {"requests": [{}]}, spec) for arch, spec in SPECS.items()}),
    TWO_RANKS["llava"]: scenario.multiprocess("llava", {"requests": [{}]}, ranks=2, HIPRUNE_BUDGET="16"),
    TWO_RANKS["qwen"]: scenario.multiprocess("qwen", {"requests": [{}], "engine": {"mm_encoder_tp_mode": "data"}},
                                             ranks=2, HIPRUNE_BUDGET=str(QWEN_DEFAULT)),
}


@pytest.fixture(scope="module")
def engines(shared_runs):
    """Per model: (vanilla results, pruned results)."""
    return {arch: shared_runs.pair(f"test_vllm {arch}") for arch in SPECS}


@pytest.fixture(scope="module")
def llava_runs(engines):
    return engines["llava"]


@pytest.fixture(scope="module")
def qwen_runs(engines):
    return engines["qwen"]


def test_llava_prompt_holds_the_budget_and_overrides_apply_per_request(llava_runs):
    _, pruned = llava_runs
    counts = [image_tokens(r, tiny_models.LLAVA_IMAGE) if "error" not in r else None for r in pruned]
    assert counts == [16, LLAVA_TOKENS, 5, None, 16, LLAVA_TOKENS]
    assert "hiprune_budget" in pruned[3]["error"]
    assert pruned[4]["tokens"] == pruned[0]["tokens"]  # same image, same default: same answer
    assert all(len(r["tokens"]) == 6 for r in pruned if "error" not in r)


def test_llava_full_budget_equals_vllm_without_plugin(llava_runs):
    vanilla, pruned = llava_runs
    for full in (pruned[1], pruned[5]):  # ratio 1.0, and a budget of all 64 tokens
        assert full["prompt_ids"] == vanilla[0]["prompt_ids"]
        assert full["tokens"] == vanilla[0]["tokens"]


def test_qwen_prompt_holds_the_budget_and_overrides_apply_per_request(qwen_runs):
    _, pruned = qwen_runs
    counts = [image_tokens(r, tiny_models.QWEN_IMAGE) if "error" not in r else None for r in pruned]
    assert counts == [round(0.25 * QWEN_TOKENS), QWEN_TOKENS, 5, None, round(0.25 * QWEN_TOKENS)]
    assert "hiprune_budget" in pruned[3]["error"]
    assert pruned[4]["tokens"] == pruned[0]["tokens"]


def test_qwen_full_budget_equals_vllm_without_plugin(qwen_runs):
    vanilla, pruned = qwen_runs
    assert pruned[1]["prompt_ids"] == vanilla[0]["prompt_ids"]
    assert pruned[1]["tokens"] == vanilla[0]["tokens"]


def test_qwen_kept_tokens_keep_their_unpruned_positions(qwen_runs):
    _, pruned = qwen_runs
    for result in (pruned[0], pruned[2]):
        kept = result["kept"][0]
        assert kept is not None and len(kept) == image_tokens(result, tiny_models.QWEN_IMAGE)
        prefill = result["positions"][0]
        length = len(result["prompt_ids"])
        assert [row[:length] for row in prefill] == scenario.mrope_positions(
            result["prompt_ids"], tiny_models.QWEN_IMAGE, [QWEN_GRID], [kept])
        # Decoding continues after the unpruned prompt's last position.
        first_decode = result["positions"][1]
        assert [row[0] for row in first_decode] == [prefill[0][length - 1] + 1] * 3


def test_qwen_unpruned_positions_are_vllms(qwen_runs):
    vanilla, pruned = qwen_runs
    assert pruned[1]["positions"][0] == vanilla[0]["positions"][0]


def test_multiprocess_mode_gets_the_plugin_through_its_entry_point(shared_runs, llava_runs, two_ranks):
    # Default mode: the engine core and its workers are other processes, which load the plugin themselves; the
    # default comes from the environment variable this time. Same image and budget as the in-process run: same answer.
    results = shared_runs[TWO_RANKS["llava"]]
    assert image_tokens(results[0], tiny_models.LLAVA_IMAGE) == 16
    assert results[0]["tokens"] == llava_runs[1][0]["tokens"]


def test_qwen_data_parallel_encoder_selects_after_the_gather(shared_runs, qwen_runs, two_ranks):
    # mm_encoder_tp_mode="data": each rank encodes its share of the images, the scores travel with the embeddings
    # through vLLM's gather and the selection runs after it.
    results = shared_runs[TWO_RANKS["qwen"]]
    assert image_tokens(results[0], tiny_models.QWEN_IMAGE) == QWEN_DEFAULT
    assert results[0]["tokens"] == qwen_runs[1][0]["tokens"]
    first, second = results[0]["kept_per_rank"]
    assert first == second == qwen_runs[1][0]["kept"]


def test_tensor_parallel_ranks_select_the_same_tokens(shared_runs, llava_runs, two_ranks):
    # Two ranks, the ViT's heads split between them (mm_encoder_tp_mode="weights", vLLM's default): each rank sums
    # its heads, one all-reduce gives both the same scores, hence the same tokens as one rank alone.
    first, second = shared_runs[TWO_RANKS["llava"]][0]["kept_per_rank"]
    assert first == second == llava_runs[1][0]["kept"]
