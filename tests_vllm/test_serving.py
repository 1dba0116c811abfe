"""The plugin behind vLLM's OpenAI server (`make test-vllm`), driven by the `openai` client, for LLaVA and Qwen2.5-VL.

Two servers per model, each stopped when its tests are done, and one offline reference:
- main: the plugin with a server default, --trust-request-mm-kwargs, prefix caching, the processor and encoder
  caches on: load, the same image at several budgets, bad values, unreadable images;
- vanilla: vLLM without the plugin, the reference for full budgets: the same chats through vLLM's offline engine
  (scenario.py, in the session's shared processes: conftest.shared_runs; a server start costs two imports);
- constrained: the plugin with max_num_batched_tokens 8 (chunked prefill: an image's tokens span chunks) and a
  KV cache of 12 blocks (a concurrent load is preempted).
Every expected prompt length is the text's token count (the model's own tokenizer on the prompt without its image
tokens) plus the kept count from the model's grid and the budget rule, never read back from the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenario  # noqa: E402
import serving  # noqa: E402
import tiny_models  # noqa: E402

# Per model: the image size, its full token count (the grid), the server default and the text around the image
# that the chat template and vLLM's placeholder add (Qwen wraps its image tokens in vision start / end tokens).
MODELS = {
    "llava": dict(size=(112, 112), full=tiny_models.LLAVA_GRID ** 2,
                  default={"budget": 16}, image_token=tiny_models.LLAVA_IMAGE, wrap=("", ""), clamp=False),
    "qwen": dict(size=tiny_models.QWEN_IMAGE_SIZE,
                 full=(tiny_models.QWEN_IMAGE_SIZE[0] // 28) * (tiny_models.QWEN_IMAGE_SIZE[1] // 28),
                 default={"ratio": 0.25}, image_token=tiny_models.QWEN_IMAGE,
                 wrap=("<|vision_start|>", "<|vision_end|>"), clamp=True),
}
COMMON_ARGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--block-size", "32",
               "--distributed-executor-backend", "uni",  # the worker in the engine process: one start less
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--kv-cache-memory-bytes", str(64 << 20)]
CHUNK_TOKENS = 8
KV_BLOCKS = 8
CONCURRENCY = 16
LOAD_REQUESTS = 208   # 13 waves of 16
LOAD_TOKENS = 4       # generated per request under load
LONG_TOKENS = 32      # generated per request where the KV cache must fill
BATCH_TIMEOUT_S = 300  # a batch of concurrent requests (208 take about 4 s here)


def expected_kept(arch: str, mm_kwargs: dict) -> int:
    """The budget rule, restated: no key: the server default; budget 0 or ratio 1.0: every token; a budget above
    the grid: all tokens (Qwen clamps); a ratio r: round-half-even(r * n) in [1, n]."""
    spec = MODELS[arch]
    n = spec["full"]
    budget, ratio = mm_kwargs.get("hiprune_budget"), mm_kwargs.get("hiprune_ratio")
    if budget is None and ratio is None:
        budget, ratio = spec["default"].get("budget"), spec["default"].get("ratio")
    if budget is not None:
        return n if budget == 0 else min(budget, n)
    return min(n, max(1, round(ratio * n)))  # round() is half-even


@pytest.fixture(scope="module", params=sorted(MODELS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch, tiny_model):
    return tiny_model(arch)


class TextTokens:
    """Tokens of a rendered prompt other than its image's, counted by the model's own tokenizer."""

    def __init__(self, arch, model_dir):
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.before, self.after = MODELS[arch]["wrap"]
        self.before_image = self.count(f"user : {self.before}")
        self.total = self.of(serving.QUESTION)

    def count(self, text):
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def of(self, question):
        return self.count(f"user : {self.before}{self.after}{question} assistant :")


@pytest.fixture(scope="module")
def text_tokens(arch, model_dir):
    return TextTokens(arch, model_dir)


def start(model_dir, tmp_path_factory, name, args, plugin=True):
    log = str(tmp_path_factory.mktemp("logs") / f"{name}.log")
    return serving.Server(model_dir, COMMON_ARGS + args, log_path=log, plugin=plugin)


@pytest.fixture(scope="module")
def main_server(arch, model_dir, tmp_path_factory):
    args = ["--max-model-len", "512", "--max-num-seqs", str(CONCURRENCY), "--enable-prefix-caching",
            "--trust-request-mm-kwargs", "--hf-overrides", json.dumps({"hiprune": MODELS[arch]["default"]})]
    with start(model_dir, tmp_path_factory, f"{arch}-main", args) as server:
        yield server


class Asker:
    """Chat requests with one image through the openai client; returns (prompt tokens, completion tokens, text)."""

    def __init__(self, server, arch):
        self.server, self.arch = server, arch
        self.model = server.model_dir
        self.sync = server.client()
        self.in_flight = self.peak = 0

    def url(self, seed):
        return serving.image_data_url(seed, MODELS[self.arch]["size"])

    def body(self, mm_kwargs, max_tokens):
        extra = {"ignore_eos": True}
        if mm_kwargs:
            extra["mm_processor_kwargs"] = mm_kwargs
        return dict(model=self.model, max_tokens=max_tokens, temperature=0.0, extra_body=extra)

    def ask(self, seed, mm_kwargs=None, max_tokens=LOAD_TOKENS, url=None, question=serving.QUESTION):
        answer = self.sync.chat.completions.create(messages=serving.messages(url or self.url(seed), question),
                                                   **self.body(mm_kwargs, max_tokens))
        return answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.choices[0].message.content

    def many(self, jobs, concurrency, question=serving.QUESTION):
        """jobs: (seed, mm_kwargs, max_tokens, url or None); answers in order, or the exception for a failed one."""

        async def run():
            client = self.server.async_client()
            gate = asyncio.Semaphore(concurrency)

            async def one(seed, mm_kwargs, max_tokens, url):
                async with gate:
                    self.in_flight += 1
                    self.peak = max(self.peak, self.in_flight)
                    try:
                        answer = await client.chat.completions.create(
                            messages=serving.messages(url or self.url(seed), question),
                            **self.body(mm_kwargs, max_tokens))
                    finally:
                        self.in_flight -= 1
                return answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.choices[0].message.content

            try:  # each request is bounded by the client's timeout, the whole batch by BATCH_TIMEOUT_S
                return await asyncio.wait_for(asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True),
                                              BATCH_TIMEOUT_S)
            finally:
                await client.close()

        self.peak = 0
        return asyncio.run(run())


@pytest.fixture(scope="module")
def asker(main_server, arch):
    return Asker(main_server, arch)


def load_kinds(arch):
    full = MODELS[arch]["full"]
    return [{"hiprune_budget": 0}, {"hiprune_budget": 1}, {}, {"hiprune_budget": full}, {"hiprune_ratio": 0.5}]


def test_load_of_mixed_budgets_at_concurrency_16(asker, arch, text_tokens):
    kinds = load_kinds(arch)
    jobs = [(i % 40, kinds[i % len(kinds)], LOAD_TOKENS, None) for i in range(LOAD_REQUESTS)]
    answers = asker.many(jobs, CONCURRENCY)
    failed = [(job, a) for job, a in zip(jobs, answers) if isinstance(a, BaseException)]
    assert not failed, failed[:3]
    assert asker.peak == CONCURRENCY
    by_input = {}
    for (seed, kwargs, _, _), (prompt, completion, text) in zip(jobs, answers):
        assert prompt == text_tokens.total + expected_kept(arch, kwargs), (seed, kwargs)
        assert completion == LOAD_TOKENS
        by_input.setdefault((seed, str(kwargs)), set()).add(text)
    # Greedy: an image at a budget gets one answer, whatever ran beside it and whatever the caches held.
    assert all(len(texts) == 1 for texts in by_input.values())
    # Every budget kind was served; the kept counts differ, so the set of prompt lengths has one per kind.
    assert len({answer[0] for answer in answers}) == len({expected_kept(arch, k) for k in kinds})


def test_same_image_at_budgets_a_b_a_keeps_each_its_own(asker, main_server, arch, text_tokens):
    a, b = {"hiprune_budget": 5}, {"hiprune_ratio": 0.5}
    seed = 1000  # not seen by this server before: the first request of each budget is a cold one
    question = " ".join([serving.QUESTION] * 10)  # prompts of more than one KV block, so that blocks are cached
    assert text_tokens.of(question) > 32
    before = main_server.metrics()
    cold_a, cold_b, warm_a = (asker.ask(seed, kwargs, question=question) for kwargs in (a, b, a))
    together = asker.many([(seed, kwargs, LOAD_TOKENS, None) for kwargs in (a, b, a, b, a)], 5, question=question)
    after = main_server.metrics()
    for kwargs, answer in [(a, cold_a), (b, cold_b), (a, warm_a)] + list(zip((a, b, a, b, a), together)):
        assert not isinstance(answer, BaseException), answer
        assert answer[0] == text_tokens.of(question) + expected_kept(arch, kwargs)
        assert answer[2] == (cold_a if kwargs is a else cold_b)[2]
    assert expected_kept(arch, a) != expected_kept(arch, b)
    # The caches were on and used: repeated prompts hit the prefix cache, repeated images the processor cache.
    for counter in ("vllm:prefix_cache_hits_total", "vllm:mm_cache_hits_total"):
        assert after[counter] > before[counter], counter


def bad_values(arch):
    values = [({"hiprune_budget": -1}, "hiprune_budget"), ({"hiprune_budget": "8"}, "hiprune_budget"),
              ({"hiprune_budget": 2.5}, "hiprune_budget"), ({"hiprune_ratio": 1.5}, "hiprune_ratio"),
              ({"hiprune_ratio": 0}, "hiprune_ratio"), ({"hiprune_budget": 4, "hiprune_ratio": 0.5}, "not both"),
              ({"hiprune_budgte": 4}, "hiprune_budgte"), ({"hiprune_alpha": 0.2}, "hiprune_alpha")]
    if not MODELS[arch]["clamp"]:  # LLaVA's images all have the grid's count: a larger budget is an error
        values.append(({"hiprune_budget": MODELS[arch]["full"] + 1}, str(MODELS[arch]["full"] + 1)))
    return values


def test_bad_values_are_answered_400_and_the_server_goes_on(asker, arch, text_tokens):
    good = text_tokens.total + expected_kept(arch, {})
    for kwargs, named in bad_values(arch):
        with pytest.raises(openai.BadRequestError) as refused:
            asker.ask(7, kwargs)
        assert refused.value.status_code == 400
        assert named in str(refused.value), (kwargs, str(refused.value))
        if any(key not in ("hiprune_budget", "hiprune_ratio") for key in kwargs):
            assert "known keys: hiprune_budget, hiprune_ratio" in str(refused.value)
        assert asker.ask(7)[0] == good  # the next request is served
    # Bad and good requests at once: each bad one fails alone.
    jobs = [(7 + i, kwargs, LOAD_TOKENS, None) for i, (kwargs, _) in enumerate(bad_values(arch))]
    jobs = [job for pair in zip(jobs, [(100 + i, {}, LOAD_TOKENS, None) for i in range(len(jobs))]) for job in pair]
    answers = asker.many(jobs, 8)
    for index, answer in enumerate(answers):
        if index % 2 == 0:
            assert isinstance(answer, openai.BadRequestError), answer
        else:
            assert not isinstance(answer, BaseException), answer
            assert answer[0] == good


def unreadable_images(arch):
    png = base64.b64decode(serving.image_data_url(3, MODELS[arch]["size"]).split(",", 1)[1])
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    return [garbage, truncated]


def test_an_unreadable_image_fails_its_request_alone(asker, arch, text_tokens):
    bad = unreadable_images(arch)
    jobs = [(200, {}, LOAD_TOKENS, None), (0, {}, LOAD_TOKENS, bad[0]), (201, {"hiprune_budget": 3}, LOAD_TOKENS, None),
            (0, {}, LOAD_TOKENS, bad[1]), (202, {"hiprune_budget": 0}, LOAD_TOKENS, None)]
    answers = asker.many(jobs, len(jobs))
    for (seed, kwargs, _, url), answer in zip(jobs, answers):
        if url is not None:
            assert isinstance(answer, openai.BadRequestError), answer
        else:
            assert not isinstance(answer, BaseException), answer
            assert answer[0] == text_tokens.total + expected_kept(arch, kwargs)
    assert asker.ask(200)[2] == answers[0][2]


FULL_SEEDS = (2000, 2001, 2002)


def _vanilla_chats(arch) -> dict:
    return {"engine": {"block_size": 32}, "requests": [
        {"messages": serving.messages(serving.image_data_url(seed, MODELS[arch]["size"])),
         "chat_template": serving.CHAT_TEMPLATE, "max_tokens": LONG_TOKENS} for seed in FULL_SEEDS]}


# conftest.shared_runs: vLLM without the plugin, the reference for full budgets: the chat the server gets, rendered
# with the server's template by vLLM's offline engine (no per-request keys: it would not know them), instead of a
# server each.
SHARED_ENGINES = {f"serving {arch}" + scenario.WITHOUT_PLUGIN: scenario.Engine(arch, _vanilla_chats(arch),
                                                                             plugin=False) for arch in MODELS}


@pytest.fixture(scope="module")
def vanilla_answers(arch, shared_runs):
    """Each FULL_SEEDS image's (prompt tokens, completion tokens, text) from vLLM without the plugin."""
    return [(len(r["prompt_ids"]), len(r["tokens"]), r["text"])
            for r in shared_runs[f"serving {arch}" + scenario.WITHOUT_PLUGIN]]


def test_full_budget_equals_vllm_without_the_plugin(asker, arch, vanilla_answers, text_tokens):
    full = MODELS[arch]["full"]
    for kwargs in ({"hiprune_budget": 0}, {"hiprune_ratio": 1.0}, {"hiprune_budget": full}):
        ours = [asker.ask(seed, kwargs, LONG_TOKENS) for seed in FULL_SEEDS]
        assert ours == vanilla_answers, kwargs
    assert vanilla_answers[0][0] == text_tokens.total + full


CONSTRAINED_KINDS = ({}, {"hiprune_budget": 5}, {"hiprune_budget": 2})


@pytest.fixture(scope="module")
def constrained_runs(arch, model_dir, tmp_path_factory, asker):
    """The main server's answers (the reference), then the same requests on a server with small prefill chunks and
    a KV cache of KV_BLOCKS blocks: first one at a time (chunking alone), then 8 at once (preemption too)."""
    jobs = [(3000 + i, kinds, LONG_TOKENS, None) for i in range(4) for kinds in CONSTRAINED_KINDS]
    reference = [asker.ask(seed, kwargs, tokens) for seed, kwargs, tokens, _ in jobs]
    args = ["--max-model-len", "160", "--max-num-seqs", "8", "--max-num-batched-tokens", str(CHUNK_TOKENS),
            "--enable-chunked-prefill", "--no-enable-prefix-caching", "--num-gpu-blocks-override", str(KV_BLOCKS), "--trust-request-mm-kwargs",
            "--hf-overrides", json.dumps({"hiprune": MODELS[arch]["default"]})]
    with start(model_dir, tmp_path_factory, f"{arch}-constrained", args) as server:
        constrained = Asker(server, arch)
        one_at_a_time = [constrained.ask(seed, kwargs, tokens) for seed, kwargs, tokens, _ in jobs]
        before = server.metrics()
        together = constrained.many(jobs, 8)
        after = server.metrics()
        try:
            full = constrained.ask(3000, {"hiprune_budget": 0}, LONG_TOKENS)
        except openai.BadRequestError as refused:
            full = refused
    preemptions = after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    return dict(jobs=jobs, reference=reference, one_at_a_time=one_at_a_time, together=together,
                preemptions=preemptions, full=full)


def test_chunked_prefill_splits_an_image_and_changes_no_answer(constrained_runs, arch, text_tokens):
    start_at = text_tokens.before_image
    for _, kwargs, _, _ in constrained_runs["jobs"]:
        kept = expected_kept(arch, kwargs)
        if kwargs == {}:  # the server default's kept tokens cross a chunk boundary
            assert start_at // CHUNK_TOKENS != (start_at + kept - 1) // CHUNK_TOKENS
    assert constrained_runs["one_at_a_time"] == constrained_runs["reference"]


def test_preemption_loses_no_request_and_changes_no_answer(constrained_runs):
    assert constrained_runs["preemptions"] > 0  # the load did not fit in the KV cache
    failed = [a for a in constrained_runs["together"] if isinstance(a, BaseException)]
    assert not failed, failed[:3]
    assert list(constrained_runs["together"]) == constrained_runs["reference"]


def test_a_budget_above_the_server_default_fits_the_encoder_cache(constrained_runs, arch, text_tokens):
    # vLLM sizes the encoder cache from dummy inputs; they go through our processor unpruned, so a request that
    # keeps every token fits even with max_num_batched_tokens below an image's full count.
    full = constrained_runs["full"]
    assert not isinstance(full, BaseException), str(full)
    assert full[0] == text_tokens.total + MODELS[arch]["full"]
