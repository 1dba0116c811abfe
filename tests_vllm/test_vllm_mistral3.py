"""Tier 2 for the Mistral 3 binding (Pixtral tower, 2 x 2 patch merger): a budget per image, every row marker kept,
and the language model getting apply_hiprune's sequence (each row's kept tokens, then its marker).

The tiny model (tiny_families.build_mistral3): 14 px patches merged 2 x 2, so a 112 x 168 image is 4 rows of 6 tokens
and a 168 x 112 one 6 rows of 4. One engine without the plugin and one with it, every case reading the same runs.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import tiny_families  # noqa: E402
from scenario import kept  # noqa: E402

IMG, BREAK, END = (tiny_families.PIXTRAL_SPECIAL[t] for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
RATIO = 0.25
TWO = {"images": [[112, 168], [168, 112]], "image_seed": 10}
GRIDS = {(112, 168): (4, 6), (168, 112): (6, 4)}  # merged rows, columns


ENGINE = {"limit_mm_per_prompt": {"image": 2, "video": 0}}
SHARED_ENGINES = scenario.engine_pairs({"mistral3": ("mistral3",  # conftest.shared_runs
    {"engine": ENGINE, "requests": [{}, TWO]},
    {"engine": ENGINE, "hf_overrides": {"hiprune": {"ratio": RATIO}}, "requests": [
        *scenario.image_requests(TWO, 5),  # 0 to 5
        {"mm_processor_kwargs": {"hiprune_budget": 100}},      # 6 clamped
    ]})})


@pytest.fixture(scope="module")
def runs(shared_runs):
    return shared_runs.pair("mistral3")


def per_image(prompt_ids):
    """(image tokens, row markers) of each image: the prompt cut after each [IMG_END]."""
    images, tokens, markers = [], 0, 0
    for t in prompt_ids:
        tokens += t == IMG
        markers += t in (BREAK, END)
        if t == END:
            images.append((tokens, markers))
            tokens = markers = 0
    return images


def test_placeholders_per_image_and_per_request_with_every_row_marker(runs):
    _, pruned = runs
    one, two = (4 * 6, 4), [(4 * 6, 4), (6 * 4, 6)]
    expected = [[(kept(RATIO, 24), 4)], [one], [(5, 4)], [(kept(RATIO, 24), 4)],
                [(kept(RATIO, n), rows) for n, rows in two], two, [one]]
    assert [per_image(r["prompt_ids"]) for r in pruned] == expected
    assert [[len(i) for i in r["kept"]] for r in pruned] == [[6], [], [5], [], [6, 6], [], []]  # 3: encoder cache
    assert pruned[3]["tokens"] == pruned[0]["tokens"]  # the override did not stick


def test_full_budget_equals_vllm_without_plugin(runs):
    vanilla, pruned = runs
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[5], vanilla[1]), (pruned[6], vanilla[0])):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["positions"] == theirs["positions"]
    for ours, theirs in ((pruned[1], vanilla[0]), (pruned[5], vanilla[1])):
        assert ours["embeddings"] == theirs["embeddings"]


def test_the_language_model_gets_each_rows_kept_tokens_then_its_marker(runs):
    vanilla, pruned = runs
    sizes = [[112, 168]]
    break_rows, end_rows = [], []
    for ours, full, image_sizes in ((pruned[0], vanilla[0], sizes), (pruned[2], vanilla[0], sizes),
                                    (pruned[4], vanilla[1], TWO["images"])):
        for embedding, whole, indices, size in zip(ours["embeddings"], full["embeddings"], ours["kept"],
                                                   image_sizes):
            rows, cols = GRIDS[tuple(size)]
            assert indices == sorted(set(indices))
            assert len(embedding) == len(indices) + rows
            at = 0
            for row in range(rows):
                in_row = [i for i in indices if i // cols == row]
                assert embedding[at:at + len(in_row)] == [whole[i] for i in in_row]  # the tower's, gathered
                (end_rows if row == rows - 1 else break_rows).append(embedding[at + len(in_row)])
                at += len(in_row) + 1
    # the markers' rows: one embedding each ([IMG_BREAK]'s, [IMG_END]'s), not an image token's
    assert all(row == break_rows[0] for row in break_rows) and all(row == end_rows[0] for row in end_rows)
    assert break_rows[0] != end_rows[0]


def test_kept_tokens_take_consecutive_positions(runs):
    _, pruned = runs
    for result in pruned:
        length = len(result["prompt_ids"])
        assert result["positions"][0] == list(range(length))
        assert result["positions"][1] == [length]
