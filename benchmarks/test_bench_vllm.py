"""bench_vllm.py without vLLM: its arguments, and what its FLOPs prediction counts for the Qwen3-VL shape."""

import pytest

from benchmarks import bench_vllm


@pytest.mark.parametrize("argv, named", [
    (["--model", "qwen3_vl", "--ratios", "0.33,1.5"], "--ratios"),
    (["--model", "qwen3_vl", "--image-size", "1000"], "--image-size"),
    (["--budgets", "192,0"], "--budgets"),
    (["--rounds", "0"], "--rounds"),
    (["--model", "qwen3_vl", "--vision-layers", "1"], "--vision-layers"),
    (["--model", "gemma"], "--model"),
])
def test_bad_arguments_are_refused_by_name(argv, named, capsys):
    with pytest.raises(SystemExit):
        bench_vllm.parse_args(argv)
    assert named in capsys.readouterr().err


def test_each_model_has_its_own_depths_and_candidates():
    llava = bench_vllm.parse_args([])
    assert (llava.vision_layers, llava.text_layers) == (4, 2)
    assert list(bench_vllm.SHAPES["llava"].candidates(llava).values()) == [
        {"hiprune_budget": 0}, {"hiprune_budget": 192}, {"hiprune_budget": 128}, {"hiprune_budget": 64}]
    qwen = bench_vllm.parse_args(["--model", "qwen3_vl"])
    assert (qwen.vision_layers, qwen.text_layers, qwen.image_size) == (24, 4, 1600)
    assert list(bench_vllm.SHAPES["qwen3_vl"].candidates(qwen).values()) == [
        {"hiprune_ratio": 1.0}, {"hiprune_ratio": 0.33}, {"hiprune_ratio": 0.11}]


def test_qwen3_vl_deepstack_blocks_are_the_released_ones_at_full_depth():
    assert bench_vllm.qwen3_vl_deepstack(24) == [5, 11, 17]
    assert bench_vllm.qwen3_vl_deepstack(8) == [2, 4, 6]


def test_qwen3_vl_prediction_counts_the_tower_for_every_request_and_scoring_for_pruned_ones():
    args = bench_vllm.parse_args(["--model", "qwen3_vl"])
    text = 12
    t = bench_vllm.QWEN3_VL_TEXT

    def language(image_tokens):
        return bench_vllm.language_flops(image_tokens + text, 4, t["hidden_size"], t["intermediate_size"], 32 * 128,
                                         8 * 128, t["vocab_size"])

    patches = 100 * 100
    scoring = 2 * 2 * 2 * patches * patches * 1024
    dense, pruned = bench_vllm.qwen3_vl_flops(2500, text, args), bench_vllm.qwen3_vl_flops(825, text, args)
    assert dense - pruned == language(2500) - language(825) - scoring
    # The tower (24 blocks, full attention over 10,000 patches) is most of a dense request at this depth.
    assert dense - language(2500) > 0.5 * dense
