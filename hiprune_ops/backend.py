"""Which implementation runs an op: the C++ extension ("cpp", CPU or CUDA kernels), Triton, or pure torch.

backend="auto" (the default, or HIPRUNE_BACKEND) takes the C++ kernel for the input's device when it was built,
else Triton on CUDA, else the torch reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def built_for_torch() -> str | None:
    """The torch version hiprune_ops._C was compiled against (setup.py writes it beside the extension)."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_C.torch_version")) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """Imports hiprune_ops._C, which registers the hiprune ops and their C++ kernels.

    Raises ImportError, naming both versions, when the extension was built for another torch than this one.
    """
    if importlib.util.find_spec("hiprune_ops._C") is None:
        return False
    built_for = built_for_torch()
    if built_for is not None and built_for != torch.__version__:
        raise ImportError(
            f"hiprune_ops._C was built for torch {built_for}, but torch {torch.__version__} is installed: rebuild "
            "it against this torch (pip install --no-build-isolation ., or python setup.py build_ext --inplace)")
    try:
        importlib.import_module("hiprune_ops._C")
    except ImportError as error:
        warnings.warn(f"hiprune_ops._C (built for torch {built_for or 'unknown'}) failed to load under torch "
                      f"{torch.__version__}, using the torch reference: {error}")
        return False
    return True


def has_cpp_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel of hiprune::<op> for this device (dispatcher truth)."""
    key = _DISPATCH_KEYS.get(device_type)
    return (key is not None and extension_loaded()
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"hiprune::{op}", key))


def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA, and on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported) with
    a torch whose wrap_triton takes the interpreter's kernels (torch 2.6 with triton 3.2 refuses them)."""
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device_type == "cuda" or _wrap_triton_takes_interpreted_kernels()


@functools.lru_cache(maxsize=None)
def _wrap_triton_takes_interpreted_kernels() -> bool:
    from ._triton_probe import probe_kernel
    try:
        torch.library.wrap_triton(probe_kernel)
    except RuntimeError:
        return False
    return True


@torch.compiler.assume_constant_result  # a pure function of its arguments: torch.compile traces the choice
def resolve(backend: str | None, op: str, device: torch.device) -> str:
    """Returns the concrete backend ("cpp", "triton" or "torch") for op on device, or raises naming `backend`.

    Choosing "triton" imports hiprune_ops.triton_kernels, which registers torch.ops.hiprune_triton.
    """
    backend = backend or os.environ.get("HIPRUNE_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if has_cpp_kernel(op, device.type):
            return "cpp"
        if device.type == "cuda" and triton_usable("cuda"):
            importlib.import_module("hiprune_ops.triton_kernels")
            return "triton"
        return "torch"
    if backend == "cpp" and not has_cpp_kernel(op, device.type):
        raise RuntimeError(f"backend='cpp' has no hiprune::{op} kernel for {device.type}: the extension was not "
                           "built for it (see README: build)")
    if backend == "triton":
        if not triton_usable(device.type):
            raise RuntimeError(f"backend='triton' cannot run on {device.type}: it needs CUDA, or TRITON_INTERPRET=1 "
                               "set before triton is imported for CPU tensors, and a torch whose wrap_triton "
                               "takes the interpreter's kernels (torch 2.6 does not)")
        importlib.import_module("hiprune_ops.triton_kernels")
    return backend
