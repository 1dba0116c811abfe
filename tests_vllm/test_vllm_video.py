"""Tier 2: videos pruned per temporal slice by the Qwen-style and GLM bindings, in real vLLM.

Three layouts of a video's placeholders (tiny models of tiny_families.py and tiny_models.py): Qwen2-VL and
Qwen2.5-VL (one run per video; Qwen2.5-VL's tower runs in window order and its slices are 4 position steps apart:
second_per_grid_ts x tokens_per_second), Qwen3-VL (one run per slice, a timestamp before each, deepstack rows) and
GLM-4.1V (one run per slice, in the image placeholder id). Per family two engines, one without the plugin and one
with it, each serving every request, in the session's shared processes (conftest.shared_runs); one more engine
checks the refusal with vLLM's own video pruning (EVS).
Expected counts come from the budget rule and the videos' sizes; positions and embeddings from the unpruned run.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
import tiny_models  # noqa: E402

FRAMES = 4  # 2 temporal slices (temporal_patch_size 2)
SLICES = FRAMES // 2
# family -> (its frame size, whether each slice has its own run of placeholders, its merged tokens per slice)
VIDEO_FAMILIES = {
    "qwen2_vl": (list(tiny_families.QWEN2_SIZE), False, 24),
    "qwen2_5_vl": (list(tiny_models.QWEN_IMAGE_SIZE), False, 24),
    "qwen3_vl": (list(tiny_families.QWEN3_SIZE), True, 24),
    "glm4v": (list(tiny_families.QWEN2_SIZE), True, 24),
}
# scenario's name (conftest.tiny_model's too), image and video placeholder ids of the one family outside
# tiny_families
QWEN2_5_VL = ("qwen", tiny_models.QWEN_IMAGE, tiny_models.QWEN_VIDEO)


def family_of(name):
    """(scenario's name, image placeholder id, video placeholder id) of a family."""
    if name == "qwen2_5_vl":
        return QWEN2_5_VL
    family = tiny_families.FAMILIES[name]
    return name, family.image_token, family.video_token
RATIO, VIDEO_BUDGET = 0.25, 5
ENGINE = {"limit_mm_per_prompt": {"image": 1, "video": 1}}


def requests_of(name):
    """(vanilla requests, pruned requests) of one family."""
    size, _, _ = VIDEO_FAMILIES[name]
    video = {"videos": [[FRAMES, *size]]}
    both = dict(video, images=[size], image_seed=20)  # an image, then a video, in one prompt
    return [video, both], [
        video,                                                                            # 0 default
        dict(video, mm_processor_kwargs={"hiprune_video_ratio": 1.0}),                    # 1 off
        dict(video, mm_processor_kwargs={"hiprune_video_budget": 3}),                     # 2
        both,                                                                             # 3
        dict(both, mm_processor_kwargs={"hiprune_budget": 0, "hiprune_video_budget": 0}),  # 4 off
        dict(video, mm_processor_kwargs={"hiprune_video_budget": -1}),                    # 5 bad
        dict(video, mm_processor_kwargs={"hiprune_video_budget": 99}),                    # 6 clamp
    ]


def _pairs() -> dict:
    pairs = {}
    for name in VIDEO_FAMILIES:
        vanilla, pruned = requests_of(name)
        pairs[f"video {name}"] = (family_of(name)[0], {"engine": ENGINE, "requests": vanilla}, {
            "engine": ENGINE, "requests": pruned, "hf_overrides": {"hiprune": {"ratio": RATIO,
                                                                               "video_budget": VIDEO_BUDGET}}})
    return pairs


# conftest.shared_runs; the last: a video setting with vLLM's own video pruning (EVS) must refuse to start (on
# Qwen3-VL: the refusal is the shared Qwen-style constructor's).
EVS_REFUSAL = "video qwen3_vl with EVS and a video setting"
SHARED_ENGINES = {**scenario.engine_pairs(_pairs()), EVS_REFUSAL: scenario.Engine("qwen3_vl", {
    "engine": dict(ENGINE, video_pruning_rate=0.5), "hf_overrides": {"hiprune": {"video_ratio": 0.5}},
    "requests": [{}]}, refuses=True)}


@pytest.fixture(scope="module")
def engines(shared_runs):
    """name -> (vanilla runs, pruned runs) of every family."""
    return {name: shared_runs.pair(f"video {name}") for name in VIDEO_FAMILIES}


@pytest.fixture(params=list(VIDEO_FAMILIES))
def video_runs(request, engines):
    """(family name, vanilla runs, pruned runs) of one family."""
    return (request.param, *engines[request.param])


def runs_of(result, token):
    return scenario.token_runs(result, token)


def video_runs_expected(name, per_slice):
    _, per_slice_runs, _ = VIDEO_FAMILIES[name]
    return [per_slice] * SLICES if per_slice_runs else [per_slice * SLICES]


def test_video_placeholders_per_slice_and_per_request(video_runs):
    name, vanilla, pruned = video_runs
    (_, image_token, token), (_, _, n) = family_of(name), VIDEO_FAMILIES[name]
    assert runs_of(vanilla[0], token) == video_runs_expected(name, n)
    assert runs_of(pruned[0], token) == video_runs_expected(name, VIDEO_BUDGET)
    assert runs_of(pruned[1], token) == video_runs_expected(name, n)
    assert runs_of(pruned[2], token) == video_runs_expected(name, 3)
    assert runs_of(pruned[6], token) == video_runs_expected(name, n)  # a budget above a slice keeps it whole
    assert [len(k) for k in pruned[0]["kept"]] == [VIDEO_BUDGET] * SLICES
    assert [len(k) for k in pruned[2]["kept"]] == [3] * SLICES
    # Image and video in one prompt: the image keeps its ratio, each video slice the video budget.
    image = [scenario.kept(RATIO, n)]
    if token == image_token:  # GLM: video frames use the image placeholder id
        assert runs_of(pruned[3], token) == image + video_runs_expected(name, VIDEO_BUDGET)
    else:
        assert runs_of(pruned[3], image_token) == image
        assert runs_of(pruned[3], token) == video_runs_expected(name, VIDEO_BUDGET)
    assert [len(k) for k in pruned[3]["kept"]] == image + [VIDEO_BUDGET] * SLICES


def test_video_bad_request_value_names_its_key(video_runs):
    _, _, pruned = video_runs
    assert "hiprune_video_budget" in pruned[5]["error"]
    assert "tokens" not in pruned[5]  # refused, the engine goes on serving (request 6 ran)
    assert "tokens" in pruned[6]


def test_video_full_budget_equals_vllm_without_plugin(video_runs):
    _, vanilla, pruned = video_runs
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[4], vanilla[1])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"][0] == theirs["positions"][0]
        assert ours["embeddings"] == theirs["embeddings"]


def slice_rows(kept_per_slice, plane):
    """A video's (or an image's) kept rows: each slice's kept indices, offset by the slices before it."""
    return [s * plane + i for s, indices in enumerate(kept_per_slice) for i in indices]


def test_video_kept_embeddings_are_the_towers_at_the_kept_indices(video_runs):
    # Qwen3-VL: the rows hold the deepstack levels too, so they are checked at the same indices.
    name, vanilla, pruned = video_runs
    n = VIDEO_FAMILIES[name][2]
    for ours, full in ((pruned[0], vanilla[0]), (pruned[2], vanilla[0])):
        (embedding,), (whole,) = ours["embeddings"], full["embeddings"]
        for indices in ours["kept"]:
            assert indices == sorted(indices) and len(set(indices)) == len(indices)
        assert embedding == [whole[row] for row in slice_rows(ours["kept"], n)]
    ours, full = pruned[3], vanilla[1]
    image_kept, video_kept = ours["kept"][:1], ours["kept"][1:]
    assert ours["embeddings"][0] == [full["embeddings"][0][row] for row in slice_rows(image_kept, n)]
    assert ours["embeddings"][1] == [full["embeddings"][1][row] for row in slice_rows(video_kept, n)]


def expected_positions(pruned, vanilla, placeholders, kept_per_slice):
    """The unpruned run's positions at the kept tokens and every text token: the prompts align run for run; a run
    of placeholders takes the next slices' kept indices (a Qwen2-VL video run: all its slices)."""
    def segments(ids):
        out, i = [], 0
        while i < len(ids):
            j = i + 1
            if ids[i] in placeholders:
                while j < len(ids) and ids[j] == ids[i]:
                    j += 1
            out.append((i, j))
            i = j
        return out

    ours, theirs = segments(pruned["prompt_ids"]), segments(vanilla["prompt_ids"])
    assert len(ours) == len(theirs)
    rows, queue = [[], [], []], list(kept_per_slice)
    full = vanilla["positions"][0]
    for (start, end), (full_start, full_end) in zip(ours, theirs):
        if pruned["prompt_ids"][start] not in placeholders:
            columns = [full_start]
        else:
            taken, count = [], 0
            while count < end - start:
                taken.append(queue.pop(0))
                count += len(taken[-1])
            columns = [full_start + row for row in slice_rows(taken, (full_end - full_start) // len(taken))]
        for r in range(3):
            rows[r].extend(full[r][c] for c in columns)
    assert not queue
    return rows


def test_video_kept_tokens_keep_their_positions(video_runs):
    name, vanilla, pruned = video_runs
    placeholders = set(family_of(name)[1:])
    if name == "qwen2_5_vl":  # the slices' t positions are scaled (1 s per slice x 4 tokens per second): exercised
        video, full = family_of(name)[2], vanilla[0]
        t_row = {full["positions"][0][0][i] for i, token in enumerate(full["prompt_ids"]) if token == video}
        assert max(t_row) - min(t_row) == 4
    for ours, theirs in ((pruned[0], vanilla[0]), (pruned[2], vanilla[0]), (pruned[3], vanilla[1])):
        length, full_length = len(ours["prompt_ids"]), len(theirs["prompt_ids"])
        assert length < full_length
        prefill = ours["positions"][0]
        assert [row[:length] for row in prefill] == expected_positions(ours, theirs, placeholders, ours["kept"])
        # Generation continues where the unpruned prompt would have.
        assert [row[0] for row in ours["positions"][1]] == [theirs["positions"][0][r][full_length - 1] + 1
                                                            for r in range(3)]


def test_video_setting_with_vllm_video_pruning_is_refused_at_start(shared_runs):
    output = shared_runs[EVS_REFUSAL]
    assert "hiprune" in output and "video_pruning_rate" in output and "EVS" in output
