"""Tier 2 for the Qwen-style families bound on the shared layer (Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) and for
the refusal of uncovered architectures.

Tiny random models come from tiny_families.py (built once per session: conftest.tiny_model). The in-process engines
run in the session's shared processes (conftest.shared_runs). Expected counts and positions are computed here from
the images' sizes and the budget rule, not read from the engine.
"""

import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept, mrope_positions, token_runs  # noqa: E402

# Per family: pixels per merged token (patch x 2x2 merge) and two image sizes, the family's own and a smaller one of
# another shape (both within the tiny processor's pixel range, multiples of the unit: no resize). Merged grids:
# 6 x 4 and 3 x 5, so 24 and 15 tokens.
QWEN_FAMILIES = {
    "qwen2_vl": (28, [list(tiny_families.QWEN2_SIZE), [84, 140]], {}),
    "qwen3_vl": (32, [list(tiny_families.QWEN3_SIZE), [96, 160]], {}),
    "qwen3_vl_moe": (32, [list(tiny_families.QWEN3_SIZE), [96, 160]], {}),
    # vLLM's CPU kernel for Qwen3.5's linear-attention layers takes bfloat16 only.
    "qwen3_5": (32, [list(tiny_families.QWEN3_SIZE), [96, 160]], {"dtype": "bfloat16"}),
}
RATIO = 0.25
TWO_IMAGE_SEED = 10  # other images than the one-image requests': no cache hit


UNCOVERED = "blip2"  # its language model sees Q-Former queries, not patches: no binding, none planned
# Qwen3-VL with vLLM's own video pruning (EVS), which the plugin cannot run with, and no HiPrune setting. EVS kills
# the CPU build's engine at its first image (docs/vllm.md): text-only chats run, the refused request never reaches it.
EVS = "qwen3_vl with video_pruning_rate"
EVS_ENGINE = {"limit_mm_per_prompt": {"image": 1, "video": 0}, "video_pruning_rate": 0.5}
TEXT_ONLY = {"messages": [{"role": "user", "content": "describe the picture please"}],
             "chat_template": "{% for m in messages %}user : {{ m['content'] }} {% endfor %}"}


def _pairs() -> dict:
    """name -> (model, vanilla spec, pruned spec) of every Qwen-style family, of the uncovered family and of EVS (the
    last two with the plugin but no setting)."""
    pairs = {}
    for name, (_, sizes, engine) in QWEN_FAMILIES.items():
        engine = dict(engine, limit_mm_per_prompt={"image": 2, "video": 0})
        two = {"images": sizes, "image_seed": TWO_IMAGE_SEED}
        pairs[name] = (name, {"engine": engine, "requests": [{}, two]}, {
            "engine": engine, "hf_overrides": {"hiprune": {"ratio": RATIO}}, "requests": [
                {},                                                    # 0 the server default
                {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},       # 1 off
                {"mm_processor_kwargs": {"hiprune_budget": 5}},        # 2 this request's budget
                dict(two),                                             # 3 two sizes
                dict(two, mm_processor_kwargs={"hiprune_budget": 0}),  # 4 off
                {},                                                    # 5 the default again
            ]})
    pairs[UNCOVERED] = (UNCOVERED, {"requests": [{}]},
                        {"requests": [{}, {"mm_processor_kwargs": {"hiprune_budget": 4}}]})
    pairs[EVS] = ("qwen3_vl", {"engine": EVS_ENGINE, "requests": [TEXT_ONLY]}, {"engine": EVS_ENGINE, "requests": [
        TEXT_ONLY, {"mm_processor_kwargs": {"hiprune_budget": 4}}, TEXT_ONLY]})
    return {f"families {name}": pair for name, pair in pairs.items()}


TWO_RANKS = "families qwen3_vl, two ranks"
# conftest.shared_runs; an uncovered architecture given a setting must refuse to start.
SHARED_ENGINES = {**scenario.engine_pairs(_pairs()), "families uncovered with a setting": scenario.Engine(
    UNCOVERED, {"hf_overrides": {"hiprune": {"ratio": 0.5}}, "requests": [{}]}, refuses=True),
    TWO_RANKS: scenario.multiprocess("qwen3_vl", {"engine": {"limit_mm_per_prompt": {"image": 2, "video": 0}},
                                                  "hf_overrides": {"hiprune": {"ratio": RATIO}}, "requests": [{}]},
                                     ranks=2)}


@pytest.fixture(scope="module")
def engines(shared_runs):
    """name -> (vanilla runs, pruned runs) of every Qwen-style family, of the uncovered family and of EVS."""
    return {name: shared_runs.pair(f"families {name}") for name in [*QWEN_FAMILIES, UNCOVERED, EVS]}


@pytest.fixture(scope="module", params=list(QWEN_FAMILIES))
def qwen(request, engines):
    """(vanilla runs, pruned runs, merged grids of the two image sizes) of one Qwen-style family."""
    unit, sizes, _ = QWEN_FAMILIES[request.param]
    vanilla, pruned = engines[request.param]
    return vanilla, pruned, [(h // unit, w // unit) for h, w in sizes]


def test_qwen_placeholders_per_image_and_per_request(qwen):
    _, pruned, grids = qwen
    counts = [token_runs(r, tiny_families.QWEN_IMAGE) for r in pruned]
    n, m = (h * w for h, w in grids)
    assert (n, m) == (24, 15)
    assert counts == [[kept(RATIO, n)], [n], [5], [kept(RATIO, n), kept(RATIO, m)], [n, m], [kept(RATIO, n)]]
    assert pruned[5]["tokens"] == pruned[0]["tokens"]  # the override did not stick
    assert [len(k) for k in pruned[3]["kept"]] == counts[3]


def test_qwen_full_budget_equals_vllm_without_plugin(qwen):
    vanilla, pruned, _ = qwen
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"][0] == theirs["positions"][0]
        assert ours["embeddings"] == theirs["embeddings"]


def test_qwen_kept_embeddings_are_the_towers_at_the_kept_indices(qwen):
    # Qwen3-VL: the rows hold the deepstack levels too, so they are checked at the same indices.
    vanilla, pruned, _ = qwen
    for ours, full in ((pruned[0], vanilla[0]), (pruned[3], vanilla[1]), (pruned[2], vanilla[0])):
        assert len(ours["embeddings"]) == len(full["embeddings"]) == len(ours["kept"])
        for embedding, whole, indices in zip(ours["embeddings"], full["embeddings"], ours["kept"]):
            assert indices == sorted(indices) and len(set(indices)) == len(indices)
            assert embedding == [whole[i] for i in indices]  # bit for bit: the same tower run, gathered


def test_qwen3_vl_tensor_parallel_ranks_select_the_same_tokens(engines, shared_runs, two_ranks):
    # Two ranks, the ViT's heads split between them: each rank sums its heads, one all-reduce gives both the same
    # scores, hence the same tokens as one rank alone (the in-process default run). LLaVA's is in test_vllm.py.
    _, pruned = engines["qwen3_vl"]
    results = shared_runs[TWO_RANKS]
    first, second = results[0]["kept_per_rank"]
    assert first == second == pruned[0]["kept"]
    assert results[0]["prompt_ids"] == pruned[0]["prompt_ids"]


def test_qwen_kept_tokens_keep_their_positions(qwen):
    _, pruned, grids_of_two = qwen
    for result, grids in ((pruned[0], grids_of_two[:1]), (pruned[2], grids_of_two[:1]), (pruned[3], grids_of_two)):
        length = len(result["prompt_ids"])
        prefill = result["positions"][0]
        expected = mrope_positions(result["prompt_ids"], tiny_families.QWEN_IMAGE, grids, result["kept"])
        assert [row[:length] for row in prefill] == expected
        first_decode = result["positions"][1]
        assert [row[0] for row in first_decode] == [prefill[0][length - 1] + 1] * 3


# -- architectures without a binding: a HiPrune setting is refused at start --------------------------------------
@pytest.fixture(scope="module")
def uncovered(tiny_model):
    """(name, architecture, model path) of the tiny family the plugin has no binding for."""
    from hiprune_ops.integrations.vllm import SUPPORTED_ARCHITECTURES

    architecture = tiny_families.FAMILIES[UNCOVERED].architecture
    assert architecture not in SUPPORTED_ARCHITECTURES, "pick another uncovered tiny family for these tests"
    return UNCOVERED, architecture, tiny_model(UNCOVERED)


def test_uncovered_architecture_refuses_a_setting_at_start(uncovered, shared_runs):
    _, architecture, _ = uncovered
    output = shared_runs["families uncovered with a setting"]
    assert f"{architecture} is not covered by the HiPrune vLLM plugin" in output
    listed = re.search(r"covered architectures: ([A-Za-z0-9_, ]+)\.", output)
    assert listed, output[-3000:]
    covered = listed.group(1).split(", ")
    assert architecture not in covered
    assert {"LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration"} <= set(covered)


def test_uncovered_architecture_without_a_setting_is_vllms_own(uncovered, engines):
    vanilla, ours = engines[uncovered[0]]
    assert ours[0]["prompt_ids"] == vanilla[0]["prompt_ids"] and ours[0]["tokens"] == vanilla[0]["tokens"]
    assert "hiprune_budget" in ours[1]["error"] and "not covered" in ours[1]["error"]


# -- a binding that cannot prune with this engine: vLLM's own without a setting ------------------------------------
def test_vllm_video_pruning_without_a_setting_starts_as_vllms_own_and_refuses_hiprune_requests(engines):
    vanilla, ours = engines[EVS]
    for answered in (ours[0], ours[2]):  # the engine served on after the refused request
        assert answered["prompt_ids"] == vanilla[0]["prompt_ids"] and answered["tokens"] == vanilla[0]["tokens"]
    error = ours[1]["error"]
    assert "hiprune_budget" in error and "Qwen3VLForConditionalGeneration" in error and "EVS" in error, error
