"""Shared test setup: which backends exist here (asked of the dispatcher), and input makers."""

import os

import torch

# Triton runs CPU tensors only in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from hiprune_ops._validation import anchor_count  # noqa: E402
from hiprune_ops.backend import has_cpp_kernel, triton_usable  # noqa: E402

ANCHOR, BUFFER, REGISTER = 0, 1, 2


def pytest_report_header(config):
    """Names what the run's numbers and skips come from: the device, torch, triton, and the kernels built."""
    from hiprune_ops._report import device_description, format_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    built = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key("hiprune::select", key)]
    rows = [("device", device_description(device)), ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
            ("triton", triton_version), ("hiprune C++ kernels", ", ".join(built) or "none built")]
    return format_table("hiprune-ops test environment", ("what", "value"), rows).splitlines()


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


def assert_selection_invariants(obj, deep, idx, roles, budget, grid_h, grid_w, alpha, neighborhood):
    """The spec's invariants, checked from first principles on CPU copies of the inputs and outputs."""
    obj, deep, idx, roles = obj.cpu(), deep.cpu(), idx.cpu(), roles.cpu()
    n = grid_h * grid_w
    n_anchor = anchor_count(budget, alpha, neighborhood, False)
    assert idx.shape == (obj.shape[0], budget) and idx.dtype == torch.int64 and roles.dtype == torch.int8
    assert bool((idx[:, 1:] > idx[:, :-1]).all()) and bool((idx >= 0).all()) and bool((idx < n).all())
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if neighborhood == "square"
                                                     else [])
    for b in range(obj.shape[0]):
        kept = dict(zip(idx[b].tolist(), roles[b].tolist()))
        anchors = {t for t, r in kept.items() if r == ANCHOR}
        top = set(torch.sort(obj[b], descending=True, stable=True).indices[:n_anchor].tolist())
        assert anchors == top
        neighbours = set()
        for a in anchors:
            for dr, dc in offsets:
                r, c = a // grid_w + dr, a % grid_w + dc
                if 0 <= r < grid_h and 0 <= c < grid_w:
                    neighbours.add(r * grid_w + c)
        assert {t for t, r in kept.items() if r == BUFFER} == neighbours - anchors
        registers = [t for t, r in kept.items() if r == REGISTER]
        rest = [t for t in range(n) if t not in anchors | neighbours]
        best_rest = sorted(rest, key=lambda t: (-deep[b, t].item(), t))[:len(registers)]
        assert sorted(best_rest) == registers
