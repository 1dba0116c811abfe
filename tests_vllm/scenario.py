"""One vLLM engine, several requests, the results as JSON on the stdout line marked RESULT_MARK. Run as a script (the default
multiprocess mode needs the __main__ guard); test_vllm.py runs it in a fresh process per engine so that runs with
and without the plugin never share a ModelRegistry.

    python scenario.py MODEL_DIR ARCH '{"hf_overrides": {...}, "requests": [{"mm_processor_kwargs": {...}}, ...]}'

Each request is generated on its own (greedy). Per request: prompt token ids, generated ids, or the error text.
Runs that can spy on the workers (in-process, or VLLM_ALLOW_INSECURE_SERIALIZATION=1) also report the positions
the language model received in each step and the kept indices of the image, per tensor-parallel rank.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

RESULT_MARK = "HIPRUNE_SCENARIO_RESULT "  # vLLM may log to stdout after us (shutdown)


def image(seed: int, size):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


PROMPTS = {
    "llava": ("user : <image> describe the picture please", (112, 112)),
    "qwen": ("user : <|vision_start|><|image_pad|><|vision_end|> describe the picture please", (168, 112)),
}


def _install_position_spy(model):
    captured = []

    def hook(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        captured.append(positions.detach().cpu().clone())

    # The first decoder layer (the language model's own forward is wrapped by vLLM's compile decorator).
    model.language_model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    model._spy_positions = captured
    return True


def _take_spy(model):
    positions, model._spy_positions[:] = list(model._spy_positions), []
    last = [None if i is None else i.cpu().tolist() for i in getattr(model, "hiprune_last", [])]
    model.hiprune_last = []
    return [p.tolist() for p in positions], last


def main() -> None:
    model_dir, arch, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model_dir, max_model_len=512, dtype="float32", max_num_seqs=2, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=True,
                  compilation_config={"mode": 0})
    if spec.get("hf_overrides"):
        kwargs["hf_overrides"] = spec["hf_overrides"]
    kwargs.update(spec.get("engine", {}))
    llm = LLM(**kwargs)
    # Spying runs a function on the workers: in-process, or across processes where vLLM may pickle it.
    spy = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
           or os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1")
    if spy:
        # By module name, not __main__, so vLLM's processes can unpickle them (this folder is on PYTHONPATH).
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import scenario as importable

        llm.apply_model(importable._install_position_spy)
    prompt, size = PROMPTS[arch]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = []
    for request in spec["requests"]:
        inputs = {"prompt": prompt, "multi_modal_data": {"image": image(request.get("image_seed", 0), size)}}
        if request.get("mm_processor_kwargs") is not None:
            inputs["mm_processor_kwargs"] = request["mm_processor_kwargs"]
        try:
            out = llm.generate(inputs, params, use_tqdm=False)[0]
        except Exception as error:  # a refused request: report it and go on serving the next ones
            results.append({"error": f"{type(error).__name__}: {error}"})
            continue
        result = {"prompt_ids": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids)}
        if spy:
            per_rank = llm.apply_model(importable._take_spy)
            result["positions"], result["kept"] = per_rank[0]
            result["kept_per_rank"] = [kept for _, kept in per_rank]
        results.append(result)
    print(RESULT_MARK + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
