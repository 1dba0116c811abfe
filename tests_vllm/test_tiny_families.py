"""Every tiny family of tiny_families.py loads in vLLM's CPU build with the plugin installed but no HiPrune setting,
and answers an image prompt (and a video prompt where the family takes video) with the placeholder count its
geometry gives: vLLM's own counts, so the plugin changes nothing until a setting asks for pruning.

The engines run in the session's shared processes (conftest.shared_runs). Expected counts are computed here from the
builders' sizes.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
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
TOKENS = 4  # generated per request


def _spec(name: str) -> dict:
    """An image request, then a video request where the family takes video; the plugin on, no HiPrune setting."""
    family = F.FAMILIES[name]
    engine = dict(family.engine, max_model_len=1024,
                  limit_mm_per_prompt={"image": 1, "video": 1 if family.video_prompt else 0})
    requests = [{"max_tokens": TOKENS}]
    if family.video_prompt:
        requests.append({"videos": [[family.video_frames, *family.image_size]], "max_tokens": TOKENS})
    return {"engine": engine, "requests": requests}


# conftest.shared_runs
SHARED_ENGINES = {f"no setting {name}": scenario.Engine(name, _spec(name)) for name in F.FAMILIES}


def test_every_family_is_expected():
    assert sorted(EXPECTED) == sorted(F.FAMILIES)
    assert all((EXPECTED[n][1] is None) == (F.FAMILIES[n].video_prompt is None) for n in F.FAMILIES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_family_answers_with_its_placeholder_count(shared_runs, name):
    family = F.FAMILIES[name]
    answers = shared_runs[f"no setting {name}"]
    image_count, video_count = EXPECTED[name]
    kinds = [(family.image_token, image_count)]
    if video_count is not None:
        kinds.append((family.video_token, video_count))
    assert len(answers) == len(kinds)
    for answer, (token, count) in zip(answers, kinds):
        assert sum(1 for t in answer["prompt_ids"] if t == token) == count, answer["prompt_ids"]
        assert len(answer["tokens"]) == TOKENS and all(0 <= t < F.VOCAB for t in answer["tokens"]), answer["tokens"]
