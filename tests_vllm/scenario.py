"""One vLLM engine, several requests, the results as JSON on the stdout line marked RESULT_MARK. Run as a script (the default
multiprocess mode needs the __main__ guard); test_vllm.py runs it in a fresh process per engine so that runs with
and without the plugin never share a ModelRegistry.

    python scenario.py MODEL_DIR ARCH '{"hf_overrides": {...}, "requests": [{"mm_processor_kwargs": {...}}, ...]}'

ARCH: a key of PROMPTS, or a family of tiny_families.FAMILIES (its prompt and image size). Each request is generated
on its own (greedy). A request may give "images": [[h, w], ...] for several images of those sizes in one prompt
(the prompt's image part repeated), "question" for other words after it, and "videos": [[frames, h, w], ...] for videos (the family's video part once
per video, after the images; frames from tiny_families.video). Per request: prompt token ids, generated ids, or the
error text. Runs that can spy on the workers (in-process, or VLLM_ALLOW_INSECURE_SERIALIZATION=1) also report the
positions the language model received in each step, the kept indices of each image (of each video slice), per
tensor-parallel rank, and the embeddings the encoder returned (per image or video, without channels the plugin adds).
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
VIDEO_PROMPTS = {"qwen": "user : <|vision_start|><|video_pad|><|vision_end|> describe the picture please"}


def token_runs(prompt_ids, token: int) -> list[int]:
    """Lengths of the runs of `token` in a prompt (placeholders per image, tile or video slice)."""
    runs, previous = [], None
    for t in prompt_ids:
        if t == token:
            if previous != token:
                runs.append(0)
            runs[-1] += 1
        previous = t
    return runs


def _install_position_spy(model):
    captured = []

    def hook(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        captured.append(positions.detach().cpu().clone())

    # The first decoder layer (the language model's own forward is wrapped by vLLM's compile decorator).
    language = model.language_model.model if hasattr(model, "language_model") else model.model.text_model  # Idefics3
    language.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    model._spy_positions = captured
    embedded, kept = [], []
    original = model.embed_multimodal
    width = model.config.get_text_config().hidden_size
    if hasattr(model, "multiscale_dim"):  # Qwen3-VL: each row holds the main features, then the deepstack levels
        width = model.visual_dim + model.multiscale_dim

    def embed_multimodal(**kwargs):
        # vLLM may encode a prompt's images in several calls: each call's embeddings and kept indices are kept.
        out = original(**kwargs)
        embedded.extend(e[:, :width].detach().float().cpu().clone() for e in out)
        kept.extend(None if i is None else i.cpu().tolist() for i in getattr(model, "hiprune_last", []))
        model.hiprune_last = []
        return out

    model.embed_multimodal = embed_multimodal
    model._spy_embeddings, model._spy_kept = embedded, kept
    return True


def _take_spy(model):
    positions, model._spy_positions[:] = list(model._spy_positions), []
    embeddings, model._spy_embeddings[:] = list(model._spy_embeddings), []
    last, model._spy_kept[:] = list(model._spy_kept), []
    return [p.tolist() for p in positions], last, [e.tolist() for e in embeddings]


def _prompt_and_size(arch: str):
    if arch in PROMPTS:
        return PROMPTS[arch]
    import tiny_families

    family = tiny_families.FAMILIES[arch]
    return family.image_prompt, family.image_size


def _media_part(prompt: str):
    """(head, the placeholder words from the first to the last non-text word, tail) of a prompt."""
    words = prompt.split(" ")
    marked = [i for i, w in enumerate(words) if w.startswith("<") or w.startswith("[")]
    return words[:marked[0]], words[marked[0]:marked[-1] + 1], words[marked[-1] + 1:]


def _inputs(prompt: str, size, request: dict, arch: str = "") -> dict:
    if request.get("question") is not None:  # the words after the prompt's media part replaced ("": none)
        head, part, _ = _media_part(prompt)
        prompt = " ".join(head + part + ([request["question"]] if request["question"] else []))
    sizes = request.get("images")
    if request.get("videos") is not None:
        import tiny_families

        head, image_part, tail = _media_part(prompt)
        video_prompt = VIDEO_PROMPTS.get(arch) or tiny_families.FAMILIES[arch].video_prompt
        _, video_part, _ = _media_part(video_prompt)
        seed, videos = request.get("image_seed", 0), request["videos"]
        data = {"video": [tiny_families.video(seed + 100 + i, v[0], v[1:]) for i, v in enumerate(videos)]}
        if sizes:
            data["image"] = [image(seed + i, s) for i, s in enumerate(sizes)]
        text = " ".join(head + image_part * len(sizes or []) + video_part * len(videos) + tail)
        return {"prompt": text, "multi_modal_data": data}
    if sizes is None:
        return {"prompt": prompt, "multi_modal_data": {"image": image(request.get("image_seed", 0), size)}}
    # The prompt's image part (from its first to its last non-text word) once per image.
    head, part, tail = _media_part(prompt)
    text = " ".join(head + part * len(sizes) + tail)
    seed = request.get("image_seed", 0)
    return {"prompt": text, "multi_modal_data": {"image": [image(seed + i, s) for i, s in enumerate(sizes)]}}


def run(model_dir: str, arch: str, spec: dict, plugin: bool = True, in_process: bool = True, env=None,
        expect_failure: bool = False):
    """Runs this script in a fresh process: the results of the spec's requests, or, with expect_failure, the
    process's output (it must fail: an engine that refuses to start)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    environ = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    environ.pop("HIPRUNE_BUDGET", None)
    if in_process:
        environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not plugin:
        environ["VLLM_PLUGINS"] = "none"  # only plugins named "none": ours is not loaded
    environ.update(env or {})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), model_dir, arch, json.dumps(spec)],
                          capture_output=True, text=True, env=environ, timeout=300)
    if expect_failure:
        if done.returncode == 0:
            raise AssertionError(f"the engine started, expected a refusal:\n{done.stdout[-3000:]}")
        return done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"scenario failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    marked = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not marked:
        raise AssertionError(f"no result line:\n{done.stdout[-3000:]}")
    return json.loads(marked[-1][len(RESULT_MARK):])["results"]


def main() -> None:
    model_dir, arch, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
        import scenario as importable

        llm.apply_model(importable._install_position_spy)
    prompt, size = _prompt_and_size(arch)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = []
    for request in spec["requests"]:
        inputs = _inputs(prompt, size, request, arch)
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
            result["positions"], result["kept"], result["embeddings"] = per_rank[0]
            result["kept_per_rank"] = [kept for _, kept, _ in per_rank]
        results.append(result)
    print(RESULT_MARK + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
