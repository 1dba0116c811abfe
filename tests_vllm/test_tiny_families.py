"""Every tiny family of tiny_families.py loads in vLLM's CPU build with the plugin installed but no HiPrune setting,
and answers an image prompt (and a video prompt where the family takes video) with the placeholder count its
geometry gives: vLLM's own counts, so the plugin changes nothing until a setting asks for pruning.

The engines run one after another in a few processes (`tiny_families.py run-many`), so the file costs a few engine
starts' worth of imports, not one per family. Expected counts are computed here from the builders' sizes.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_families  # noqa: E402

F = tiny_families
QWEN2 = (F.QWEN2_SIZE[0] // 28) * (F.QWEN2_SIZE[1] // 28)      # 14 px patches, 2x2 merge: 6 x 4
QWEN3 = (F.QWEN3_SIZE[0] // 32) * (F.QWEN3_SIZE[1] // 32)      # 16 px patches, 2x2 merge: 6 x 4
SLICES = F.VIDEO_FRAMES // 2                                    # temporal_patch_size 2
# image placeholders, video placeholders (None: no video request)
EXPECTED = {
    "qwen2_vl": (QWEN2, SLICES * QWEN2),
    "qwen3_vl": (QWEN3, SLICES * QWEN3),
    "qwen3_vl_moe": (QWEN3, SLICES * QWEN3),
    "qwen3_5": (QWEN3, SLICES * QWEN3),
    "qwen3_5_moe": (QWEN3, SLICES * QWEN3),
    "glm4v": (QWEN2, SLICES * QWEN2),
    "glm4v_moe": (QWEN2, SLICES * QWEN2),
    "internvl": (3 * (8 // 2) ** 2, None),                      # 2 tiles + thumbnail, 8x8 patches shuffled to 4x4
    "gemma3": ((224 // 14 // 4) ** 2, None),                    # 16x16 patches pooled 4x4
    "paligemma": ((112 // 14) ** 2, None),                      # every patch
    # base 8x8, then the 1x2 tiles as one 8x16 grid with a newline ending each row
    "llava_next": (8 * 8 + 8 * (16 + 1), None),
    "mistral3": ((112 // 28) * (168 // 28), None),              # each image at its size, 2x2 merger
    # 224 px resized to at most 70 x 9 patches of 16 px, multiples of 48 px: 384 px, 24x24 patches pooled 3x3
    "gemma4": ((384 // 48) ** 2, F.VIDEO_FRAMES * (384 // 48) ** 2),
    # as LLaVA-NeXT without CLS; a video: each frame's 8x8 pooled 2x2, one newline after the last frame
    "llava_onevision": (8 * 8 + 8 * (16 + 1), F.VIDEO_FRAMES * 4 * 4 + 1),
    "idefics3": (3 * (8 // 2) ** 2, None),                      # 1x2 tiles + global image, pixel_shuffle 2
    "smolvlm": (3 * (16 // 4) ** 2, None),                      # the same tiles of 16x16 patches, pixel_shuffle 4
    "blip2": (8, None),                                         # the Q-Former's 8 queries, whatever the image
}
# One process per group: a crash loses one group, and each process pays vLLM's import once.
GROUPS = [["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"],
          ["glm4v", "glm4v_moe", "internvl", "gemma3", "paligemma", "blip2"],
          ["llava_next", "mistral3", "gemma4", "llava_onevision", "idefics3", "smolvlm"]]


def test_every_family_is_expected_and_grouped():
    assert sorted(EXPECTED) == sorted(F.FAMILIES) == sorted(name for group in GROUPS for name in group)
    assert all((EXPECTED[n][1] is None) == (F.FAMILIES[n].video_prompt is None) for n in F.FAMILIES)


@pytest.fixture(scope="module")
def root(tiny_model):
    """The folder holding every family's tiny model (conftest.tiny_model's, shared with the other files)."""
    paths = [tiny_model(name) for name in F.FAMILIES]
    return os.path.dirname(paths[0])


@pytest.fixture(scope="module")
def results(root):
    environ = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
    environ.pop("HIPRUNE_BUDGET", None)
    out = {}
    for group in GROUPS:
        done = subprocess.run([sys.executable, os.path.join(HERE, "tiny_families.py"), "run-many", str(root), *group],
                              capture_output=True, text=True, env=environ, timeout=600)
        marked = [line for line in done.stdout.splitlines() if line.startswith(F.RESULT_MARK)]
        if done.returncode != 0 or not marked:
            out.update({name: {"error": f"process failed ({done.returncode}): {done.stderr[-3000:]}"}
                        for name in group})
            continue
        out.update(json.loads(marked[-1][len(F.RESULT_MARK):]))
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_family_answers_with_its_placeholder_count(results, name):
    result = results[name]
    assert "error" not in result, result.get("error")
    image_count, video_count = EXPECTED[name]
    kinds = [("image", image_count)] + ([("video", video_count)] if video_count is not None else [])
    for kind, count in kinds:
        answer = result[kind]
        assert answer["placeholders"] == count, (kind, answer["prompt_ids"])
        assert len(answer["tokens"]) == 4 and all(0 <= t < F.VOCAB for t in answer["tokens"]), answer["tokens"]
