"""Tier 2 for the Qwen-style families bound on the shared layer (Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) and for
the refusal of uncovered architectures.

Tiny random models come from tiny_families.py; every engine runs in a fresh process (scenario.run). Expected counts
and positions are computed here from the images' sizes and the budget rule, not read from the engine.
"""

import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402

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
QWEN_PATHS: dict = {}  # family -> its tiny model, for tests that start one more engine


def kept(ratio, n):
    return min(n, max(1, round(ratio * n)))


@pytest.fixture(scope="module", params=list(QWEN_FAMILIES))
def qwen(request, tmp_path_factory):
    """(vanilla runs, pruned runs, merged grids of the two image sizes) of one Qwen-style family."""
    name = request.param
    unit, sizes, engine = QWEN_FAMILIES[name]
    engine = dict(engine, limit_mm_per_prompt={"image": 2, "video": 0})
    path = tiny_families.FAMILIES[name].build(str(tmp_path_factory.mktemp("families") / name))
    two = {"images": sizes, "image_seed": 10}  # other images than the one-image requests': no cache hit
    vanilla = scenario.run(path, name, {"engine": engine, "requests": [{}, two]}, plugin=False)
    pruned = scenario.run(path, name, {"engine": engine, "hf_overrides": {"hiprune": {"ratio": RATIO}},
                                             "requests": [
                                                 {},                                                   # 0 default
                                                 {"mm_processor_kwargs": {"hiprune_ratio": 1.0}},      # 1 off
                                                 {"mm_processor_kwargs": {"hiprune_budget": 5}},       # 2 override
                                                 dict(two),                                            # 3 two sizes
                                                 dict(two, mm_processor_kwargs={"hiprune_budget": 0}),  # 4 off
                                                 {},                                                   # 5 default
                                             ]})
    QWEN_PATHS[name] = path
    return vanilla, pruned, [(h // unit, w // unit) for h, w in sizes]


def image_runs(result, token):
    """Placeholders per image: the lengths of the runs of `token` in the prompt."""
    runs, previous = [], None
    for t in result["prompt_ids"]:
        if t == token:
            if previous != token:
                runs.append(0)
            runs[-1] += 1
        previous = t
    return runs


def test_qwen_placeholders_per_image_and_per_request(qwen):
    _, pruned, grids = qwen
    counts = [image_runs(r, tiny_families.QWEN_IMAGE) for r in pruned]
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


def test_qwen3_vl_tensor_parallel_ranks_select_the_same_tokens(qwen, request):
    # Two ranks, the ViT's heads split between them: each rank sums its heads, one all-reduce gives both the same
    # scores, hence the same tokens as one rank alone (the in-process default run).
    name = request.node.callspec.params["qwen"]
    if name != "qwen3_vl":
        pytest.skip("run for Qwen3-VL (LLaVA's is in test_vllm.py)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU build needs a core per rank")
    _, pruned, _ = qwen
    engine = {"tensor_parallel_size": 2, "limit_mm_per_prompt": {"image": 2, "video": 0}}
    results = scenario.run(QWEN_PATHS[name], name, {"engine": engine, "hf_overrides": {"hiprune": {"ratio": RATIO}},
                                                    "requests": [{}]}, in_process=False,
                           env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                                "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    first, second = results[0]["kept_per_rank"]
    assert first == second == pruned[0]["kept"]
    assert results[0]["prompt_ids"] == pruned[0]["prompt_ids"]


def expected_positions(prompt_ids, grids, kept_per_image):
    """The unpruned prompt's M-RoPE positions (text: one step per token; image token (r, c): (o, o + r, o + c); text
    after an image continues after its full grid) at the kept tokens and every text token."""
    rows, position, i, image = [[], [], []], 0, 0, 0
    while i < len(prompt_ids):
        if prompt_ids[i] != tiny_families.QWEN_IMAGE:
            for row in rows:
                row.append(position)
            position, i = position + 1, i + 1
            continue
        (grid_h, grid_w), indices = grids[image], kept_per_image[image]
        for index in indices:
            rows[0].append(position)
            rows[1].append(position + index // grid_w)
            rows[2].append(position + index % grid_w)
        position += max(grid_h, grid_w)
        i += len(indices)
        image += 1
    return rows


def test_qwen_kept_tokens_keep_their_positions(qwen):
    _, pruned, grids_of_two = qwen
    for result, grids in ((pruned[0], grids_of_two[:1]), (pruned[2], grids_of_two[:1]), (pruned[3], grids_of_two)):
        length = len(result["prompt_ids"])
        prefill = result["positions"][0]
        assert [row[:length] for row in prefill] == expected_positions(result["prompt_ids"], grids, result["kept"])
        first_decode = result["positions"][1]
        assert [row[0] for row in first_decode] == [prefill[0][length - 1] + 1] * 3


# -- architectures without a binding: a HiPrune setting is refused at start --------------------------------------
@pytest.fixture(scope="module")
def uncovered(tmp_path_factory):
    """(name, architecture, model path) of BLIP-2, a tiny family the plugin has no binding for and none planned (its
    language model sees Q-Former queries, not patches)."""
    from hiprune_ops.integrations.vllm import SUPPORTED_ARCHITECTURES

    family = tiny_families.FAMILIES["blip2"]
    assert family.architecture not in SUPPORTED_ARCHITECTURES, "pick another uncovered tiny family for these tests"
    return "blip2", family.architecture, family.build(str(tmp_path_factory.mktemp("families") / "blip2"))


def test_uncovered_architecture_refuses_a_setting_at_start(uncovered):
    name, architecture, path = uncovered
    output = scenario.run(path, name, {"hf_overrides": {"hiprune": {"ratio": 0.5}}, "requests": [{}]},
                          expect_failure=True)
    assert f"{architecture} is not covered by the HiPrune vLLM plugin" in output
    listed = re.search(r"covered architectures: ([A-Za-z0-9_, ]+)\.", output)
    assert listed, output[-3000:]
    covered = listed.group(1).split(", ")
    assert architecture not in covered
    assert {"LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration"} <= set(covered)


def test_uncovered_architecture_without_a_setting_is_vllms_own(uncovered):
    name, _, path = uncovered
    vanilla = scenario.run(path, name, {"requests": [{}]}, plugin=False)
    ours = scenario.run(path, name, {"requests": [{}, {"mm_processor_kwargs": {"hiprune_budget": 4}}]})
    assert ours[0]["prompt_ids"] == vanilla[0]["prompt_ids"] and ours[0]["tokens"] == vanilla[0]["tokens"]
    assert "hiprune_budget" in ours[1]["error"] and "not covered" in ours[1]["error"]
