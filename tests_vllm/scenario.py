"""vLLM engines, several requests each, the results as JSON on the stdout line marked RESULT_MARK. Run as a script
(the default multiprocess mode needs the __main__ guard); the tests run it in a fresh process, so that runs with
and without the plugin never share a ModelRegistry.

    python scenario.py MODEL_DIR ARCH '{"hf_overrides": {...}, "requests": [{"mm_processor_kwargs": {...}}, ...]}'
    python scenario.py --many '[[MODEL_DIR, ARCH, SPEC], ...]'    # one engine after another from this process
    python scenario.py --many - < JOBS.json                       # the same, the jobs read from stdin

ARCH: a key of PROMPTS, or a family of tiny_families.FAMILIES (its prompt and image size). Each request is generated
on its own (greedy, 6 tokens or its "max_tokens"). A request may give "images": [[h, w], ...] for several images of
those sizes in one prompt (the prompt's image part repeated), "question" for other words after it, "videos":
[[frames, h, w], ...] for videos (the family's video part once per video, after the images; frames from
tiny_families.video), or "messages" (and "chat_template"): a chat in the OpenAI format instead of the prompt. Per
request: prompt token ids, generated ids and text, or the error text. Runs that can spy on the workers (in-process,
or VLLM_ALLOW_INSECURE_SERIALIZATION=1) also report the positions the language model received in each step, the kept
indices of each image (of each video slice), per tensor-parallel rank, the embeddings the encoder returned (per image
or video, without channels the plugin adds) and, per image of a HiPrune++ request, the prompt text ids the encoder
got ("prompt_text_ids").

Sharing, the pattern every tier-2 file follows (a process start and vLLM's import cost more than an engine):
- models: the session fixture `tiny_model` (conftest.py) builds each tiny model once per session;
- engines: a file declares the engines it reads in a module-level SHARED_ENGINES = {name: Engine} (engine_pairs for
  an engine without the plugin beside one with it; multiprocess for vLLM's multiprocess mode and tensor parallelism;
  refuses=True for an engine that must refuse to start), each engine answering every request of its spec (a
  request list per engine, not an engine per test); conftest's `shared_runs` starts every declared engine of the
  session with its first test, in four processes side by side (in-process with the plugin: two; without it: one;
  multiprocess mode: one), and tests assert on `shared_runs[name]`;
- a process of its own only for what cannot share one: vLLM's OpenAI server (serving.py).
In those processes gc.collect() collects the young generations only, and each engine has a 64 MiB KV cache: on the
2-core box a tiny engine then starts in 2-3 s instead of 9.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from typing import Callable, Optional

import numpy as np

RESULT_MARK = "HIPRUNE_SCENARIO_RESULT "  # vLLM may log to stdout after us (shutdown)
# Per engine, its process start included: a two-rank engine took over 300 s on the 2-core box shared by other runs.
ENGINE_TIMEOUT_S = 600


def image(seed: int, size):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


PROMPTS = {
    "llava": ("user : <image> describe the picture please", (112, 112)),
    "qwen": ("user : <|vision_start|><|image_pad|><|vision_end|> describe the picture please", (168, 112)),
}
VIDEO_PROMPTS = {"qwen": "user : <|vision_start|><|video_pad|><|vision_end|> describe the picture please"}


def image_requests(two: dict, budget: int) -> list:
    """The first requests of an image family's pruned engine: 0 the server default, 1 off (hiprune_ratio 1.0), 2 this
    request's budget, 3 the default again, 4 two images of different sizes (`two`), 5 off (hiprune_budget 0) on them."""
    return [{}, {"mm_processor_kwargs": {"hiprune_ratio": 1.0}}, {"mm_processor_kwargs": {"hiprune_budget": budget}},
            {}, dict(two), dict(two, mm_processor_kwargs={"hiprune_budget": 0})]


# -- reading results: what the test files share ------------------------------------------------------------------
def kept(ratio: float, n: int) -> int:
    """The budget rule for a ratio, restated: round-half-even(ratio * n) in [1, n]."""
    return min(n, max(1, round(ratio * n)))


def token_runs(result: dict, token: int) -> list:
    """The lengths of the runs of `token` in a result's prompt: placeholders per image, tile or slice."""
    runs, previous = [], None
    for t in result["prompt_ids"]:
        if t == token:
            if previous != token:
                runs.append(0)
            runs[-1] += 1
        previous = t
    return runs


def mrope_positions(prompt_ids: list, image_token: int, grids: list, kept_per_image: list) -> list:
    """The unpruned prompt's M-RoPE positions (text: one step per token; image token (r, c) of a grid: (o, o + r,
    o + c); text after an image continues after its full grid, at o + max(h, w)) at the kept tokens and every text
    token."""
    rows, position, i, image_index = [[], [], []], 0, 0, 0
    while i < len(prompt_ids):
        if prompt_ids[i] != image_token:
            for row in rows:
                row.append(position)
            position, i = position + 1, i + 1
            continue
        (grid_h, grid_w), indices = grids[image_index], kept_per_image[image_index]
        for index in indices:
            rows[0].append(position)
            rows[1].append(position + index // grid_w)
            rows[2].append(position + index % grid_w)
        position += max(grid_h, grid_w)
        i += len(indices)
        image_index += 1
    return rows


def _install_position_spy(model):
    from hiprune_ops.integrations.vllm.settings import PROMPT_IDS_FIELD

    captured = []

    def hook(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        captured.append(positions.detach().cpu().clone())

    # The first decoder layer (the language model's own forward is wrapped by vLLM's compile decorator).
    language = model.language_model.model if hasattr(model, "language_model") else model.model.text_model  # Idefics3
    if hasattr(language, "decoder"):  # OPT (BLIP-2): its layers take no positions, its learned position table does
        language.decoder.embed_positions.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        language.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    model._spy_positions = captured
    embedded, kept, texts = [], [], []
    original = model.embed_multimodal
    width = model.config.get_text_config().hidden_size
    if hasattr(model, "multiscale_dim"):  # Qwen3-VL: each row holds the main features, then the deepstack levels
        width = model.visual_dim + model.multiscale_dim

    def embed_multimodal(**kwargs):
        # vLLM may encode a prompt's images in several calls: each call's embeddings, kept indices and prompt text
        # ids (the plugin pops them from its own copy of the kwargs) are kept.
        texts.extend([int(t) for t in ids.reshape(-1).tolist()] for ids in kwargs.get(PROMPT_IDS_FIELD, []))
        out = original(**kwargs)
        embedded.extend(e[:, :width].detach().float().cpu().clone() for e in out)
        kept.extend(None if i is None else i.cpu().tolist() for i in getattr(model, "hiprune_last", []))
        model.hiprune_last = []
        return out

    model.embed_multimodal = embed_multimodal
    model._spy_embeddings, model._spy_kept, model._spy_texts = embedded, kept, texts
    return True


def _take_spy(model):
    positions, model._spy_positions[:] = list(model._spy_positions), []
    embeddings, model._spy_embeddings[:] = list(model._spy_embeddings), []
    last, model._spy_kept[:] = list(model._spy_kept), []
    texts, model._spy_texts[:] = list(model._spy_texts), []
    return [p.tolist() for p in positions], last, [e.tolist() for e in embeddings], texts


def _prompt_and_size(arch: str):
    if arch in PROMPTS:
        return PROMPTS[arch]
    import tiny_families

    family = tiny_families.FAMILIES[arch]
    return family.image_prompt, family.image_size


def _media_part(prompt: str):
    """(head, the placeholder words from the first to the last non-text word, tail) of a prompt; a prompt without
    placeholders (PaliGemma's: the processor puts the image first) is all tail."""
    words = prompt.split(" ")
    marked = [i for i, w in enumerate(words) if w.startswith("<") or w.startswith("[")]
    if not marked:
        return [], [], words
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


def _environment(plugin: bool, in_process: bool, env) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    environ = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    environ.pop("HIPRUNE_BUDGET", None)
    if in_process:
        environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not plugin:
        environ["VLLM_PLUGINS"] = "none"  # only plugins named "none": ours is not loaded
    environ.update(env or {})
    return environ


def _result(done) -> dict:
    if done.returncode != 0:
        raise AssertionError(f"scenario failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    marked = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not marked:
        raise AssertionError(f"no result line:\n{done.stdout[-3000:]}")
    return json.loads(marked[-1][len(RESULT_MARK):])


@dataclasses.dataclass(frozen=True)
class Engine:
    """An engine of the session's shared processes (conftest.shared_runs): a tiny model (conftest.tiny_model's name),
    the spec it answers, with the plugin or without it, in-process or in vLLM's multiprocess mode (its engine core
    and workers in processes of their own, spied on); `refuses`: it must refuse to start (its outcome is then the
    error text); `variant`: (model_dir, folder) -> the folder of a changed copy of the model."""

    model: str
    spec: dict
    plugin: bool = True
    in_process: bool = True
    refuses: bool = False
    variant: Optional[Callable[[str, str], str]] = None


def multiprocess(model: str, spec: dict, ranks: int = 1, **env: str) -> Engine:
    """An Engine in vLLM's multiprocess mode with `ranks` tensor-parallel ranks, one core each (vLLM's automatic
    binding wants a NUMA node per rank), `env` set for it. A machine with fewer cores fails it: its tests skip
    (conftest.two_ranks)."""
    if ranks > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:ranks])
        spec = dict(spec, engine=dict(spec.get("engine", {}), tensor_parallel_size=ranks))
    return Engine(model, dict(spec, env=env), in_process=False)


WITHOUT_PLUGIN = " without the plugin"


def engine_pairs(pairs: dict) -> dict:
    """SHARED_ENGINES entries from name -> (model, vanilla spec, pruned spec): per name, the model's engine without
    the plugin (named name + WITHOUT_PLUGIN) answering the first spec, and its engine with the plugin (named name)
    answering the second; conftest's SharedRuns.pair(name) reads both."""
    engines = {}
    for name, (model, vanilla, pruned) in pairs.items():
        engines.update({name + WITHOUT_PLUGIN: Engine(model, vanilla, plugin=False), name: Engine(model, pruned)})
    return engines


class Many:
    """Several engines, one after another, in one fresh process, running beside the caller (and beside other Many)
    until `outcomes()`: jobs are (model_dir, arch, spec)."""

    def __init__(self, jobs, plugin: bool = True, env=None, in_process: bool = True):
        import subprocess
        import tempfile

        self.jobs = [list(job) for job in jobs]
        # On stdin: images given as data URLs would pass the length limit of one command-line argument. The output
        # goes to files: a pipe nobody reads while the process runs would fill and block it.
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--many", "-"],
                                        stdin=subprocess.PIPE, stdout=self.stdout, stderr=self.stderr, text=True,
                                        env=_environment(plugin, in_process, env), start_new_session=True)
        self.process.stdin.write(json.dumps(self.jobs))
        self.process.stdin.close()

    def stop(self) -> None:
        """Kills the process if it still runs (its engines' own processes are in its process group)."""
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def outcomes(self) -> list:
        """Per job, {"results": [...]} or {"error": "..."} (an engine that failed to start, or the process died)."""
        import subprocess

        try:
            self.process.wait(timeout=ENGINE_TIMEOUT_S * len(self.jobs))
        except subprocess.TimeoutExpired:
            self.stop()
        self.stdout.seek(0)
        self.stderr.seek(0)
        done = subprocess.CompletedProcess(self.process.args, self.process.returncode, self.stdout.read(),
                                           self.stderr.read())
        try:
            return _result(done)["many"]
        except AssertionError as crash:  # the process died: every engine of it failed
            return [{"error": str(crash)}] * len(self.jobs)


def answer(model_dir: str, arch: str, spec: dict) -> list:
    """Starts one engine and answers the spec's requests with it, then stops it. The spec's "env" is set while the
    engine runs: the engine's own processes (multiprocess mode) start with it."""
    from vllm import LLM

    saved = {key: os.environ.get(key) for key in spec.get("env", {})}
    os.environ.update(spec.get("env", {}))
    try:
        # A KV cache of 64 MiB, not VLLM_CPU_KVCACHE_SPACE's GiB: zeroing a GiB costs most of a second per engine.
        kwargs = dict(model=model_dir, max_model_len=512, dtype="float32", max_num_seqs=2, seed=0,
                      limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=True,
                      compilation_config={"mode": 0}, kv_cache_memory_bytes=64 << 20)
        if spec.get("hf_overrides"):
            kwargs["hf_overrides"] = spec["hf_overrides"]
        kwargs.update(spec.get("engine", {}))
        llm = LLM(**kwargs)
        try:
            return _answer_with(llm, arch, spec)
        finally:
            llm.llm_engine.engine_core.shutdown()  # multiprocess mode: its processes go before the next engine's
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _answer_with(llm, arch: str, spec: dict) -> list:
    from vllm import SamplingParams

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
        request_params = params.clone()
        request_params.max_tokens = request.get("max_tokens", params.max_tokens)
        try:
            if "messages" in request:  # a chat, rendered with the template as vLLM's OpenAI server renders it
                out = llm.chat(request["messages"], request_params, chat_template=request.get("chat_template"),
                               use_tqdm=False)[0]
            else:
                inputs = _inputs(prompt, size, request, arch)
                if request.get("mm_processor_kwargs") is not None:
                    inputs["mm_processor_kwargs"] = request["mm_processor_kwargs"]
                out = llm.generate(inputs, request_params, use_tqdm=False)[0]
        except Exception as error:  # a refused request: report it and go on serving the next ones
            results.append({"error": f"{type(error).__name__}: {error}"})
            continue
        result = {"prompt_ids": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
                  "text": out.outputs[0].text}
        if spy:
            per_rank = llm.apply_model(importable._take_spy)
            result["positions"], result["kept"], result["embeddings"], result["prompt_text_ids"] = per_rank[0]
            result["kept_per_rank"] = [rank[1] for rank in per_rank]
        results.append(result)
    return results


def _collect_young_generations_only() -> Callable[[], int]:
    """Makes gc.collect() collect the young generations only, and returns the full collection. vLLM collects the
    whole heap several times per engine start and stop (0.4 s each here: vLLM, torch and transformers hold millions of
    objects), which made most of a tiny engine's start; the process collects fully once per engine instead."""
    full_collect = gc.collect

    def collect(generation: int = 2) -> int:
        return full_collect(min(generation, 1))

    gc.collect = collect
    return full_collect


def _release_engine() -> None:
    """Tears down the in-process engine's distributed state so that the next engine can start in this process."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    full_collect = _collect_young_generations_only()
    if sys.argv[1] == "--many":  # each engine is torn down before the next starts
        outcomes = []
        for model_dir, arch, spec in json.loads(sys.stdin.read() if sys.argv[2] == "-" else sys.argv[2]):
            try:
                outcomes.append({"results": answer(model_dir, arch, spec)})
            except Exception as error:  # noqa: BLE001  (reported per engine; the next one still runs)
                outcomes.append({"error": f"{type(error).__name__}: {error}"})
            _release_engine()
            full_collect()
        print(RESULT_MARK + json.dumps({"many": outcomes}), flush=True)
        return
    model_dir, arch, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(RESULT_MARK + json.dumps({"results": answer(model_dir, arch, spec)}), flush=True)


if __name__ == "__main__":
    main()
