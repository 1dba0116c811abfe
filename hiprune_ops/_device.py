"""Device naming for the CLI (benchmarks/harness.py has the same for benchmarks, but is not part of the package)."""

import platform

import torch


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
