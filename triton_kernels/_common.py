"""Device functions and host helpers shared by the Triton kernels of hiprune_triton.

Rank keys are int64 here (Triton handles signed integers most reliably): the key is the uint64 key of
csrc/include/hiprune/selection.h with its top bit flipped, so signed order is the same ranking order. The
excluded key (uint64 0) becomes INT64_MIN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(t: torch.Tensor, name: str) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter; say so instead of crashing in a launch."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} is on {t.device}: the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before triton is imported for CPU tensors")


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


@triton.jit
def excluded_key():
    """Key below every rank key (the C++ kExcludedKey = 0, top bit flipped): INT64_MIN."""
    return tl.full([], -2147483648, tl.int64) << 32


@triton.jit
def rank_key(score, index):
    """Signed twin of hiprune::rank_key: higher score first, ties to the lower index, NaN below every number,
    -0.0 == +0.0. score: float32 tensor, index: integer tensor of the same shape (0 <= index < 2**31)."""
    s = tl.where(score == 0.0, 0.0, score)  # folds -0.0 into +0.0 (NaN == 0 is false, so NaN stays)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF  # the float's bits as an unsigned value
    # Unsigned order of `ordered` is numeric order: flip all bits of negatives, set the sign bit of positives.
    ordered = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    ordered = tl.where(s != s, 1, ordered)  # NaN: just above the excluded key
    low = 0xFFFFFFFF - index.to(tl.int64)  # lower index -> larger key
    return ((ordered - 0x80000000) << 32) | low


@triton.jit
def key_high(key):
    """The unsigned 32-bit score part of a key, as a non-negative int64."""
    return (key >> 32) + 0x80000000


@triton.jit
def key_low(key):
    """The unsigned 32-bit index part of a key (0xFFFFFFFF - index), as a non-negative int64."""
    return key & 0xFFFFFFFF


@triton.jit
def join_key(high, low):
    return ((high - 0x80000000) << 32) | low
