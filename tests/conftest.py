"""Shared test setup: which backends exist here (asked of the dispatcher), and input makers."""

import os

import torch

# Triton runs CPU tensors only in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import hiprune_ops  # noqa: E402
from hiprune_ops.backend import has_cpp_kernel, triton_usable  # noqa: E402


def _triton_ops_registered() -> bool:
    try:
        import hiprune_ops.triton_kernels  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops, "hiprune_triton") and hasattr(torch.ops.hiprune_triton, "select")


def backend_params(op: str):
    """pytest params (backend, device) for every backend that can run `op` here; the rest skip with a reason."""
    params = []
    for backend, device in (("cpp", "cpu"), ("torch", "cpu"), ("triton", "cpu"), ("cpp", "cuda"), ("triton", "cuda"),
                            ("torch", "cuda")):
        marks = []
        if device == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA device"))
        elif backend == "cpp" and not has_cpp_kernel(op, device):
            marks.append(pytest.mark.skip(reason=f"hiprune::{op} has no {device} kernel in this build"))
        elif backend == "triton" and not (triton_usable(device) and _triton_ops_registered()):
            marks.append(pytest.mark.skip(reason="triton backend unavailable"))
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def random_maps(batch, heads, length, *, dtype=torch.float32, seed=0, device="cpu", temperature=1.0):
    """Softmax-normalised attention maps (B, H, L, L)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, length, length, generator=g) * temperature
    return torch.softmax(logits, dim=-1).to(dtype=dtype, device=device)


def random_scores(batch, n, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=g).to(device)
