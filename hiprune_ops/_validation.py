"""Argument checks of the spec, in Python: used by the reference, the fake kernels and the Triton backend.

They raise the same errors, with the same wording, as csrc/include/hiprune/checks.h.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NEIGHBORHOODS = {"cross": 5, "square": 9}


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_attention_map(attn: torch.Tensor, num_prefix: int, name: str) -> int:
    """Validates (B, H, L, L) maps and returns N = L - num_prefix."""
    if attn.dim() != 4:
        raise ValueError(f"{name} must be (B, H, L, L) attention maps, got {attn.dim()}-D")
    check_float_dtype(attn, name)
    if attn.shape[2] != attn.shape[3]:
        raise ValueError(f"{name} must be square in its last two dims, got ({attn.shape[2]}, {attn.shape[3]})")
    if attn.shape[1] < 1:
        raise ValueError(f"{name} must have at least one head")
    if not 0 <= num_prefix < attn.shape[3]:
        raise ValueError(f"num_prefix must be in [0, L - 1] = [0, {attn.shape[3] - 1}], got {num_prefix}")
    return attn.shape[3] - num_prefix


def check_selection_input(t: torch.Tensor, num_prefix: int, name: str) -> int:
    """Validates maps (B, H, L, L) or scores (B, N); returns N."""
    if t.dim() == 2:
        check_float_dtype(t, name)
        return t.shape[1]
    if t.dim() != 4:
        raise ValueError(f"{name} must be (B, H, L, L) attention maps or (B, N) scores, got {t.dim()}-D")
    return check_attention_map(t, num_prefix, name)


def round_half_even(x: float) -> int:
    return round(x)  # Python rounds ties to even, as the C++ helper does


def anchor_count(budget: int, alpha: float, neighborhood: str, official: bool) -> int:
    per = NEIGHBORHOODS[neighborhood]
    n = round_half_even(budget * alpha / per)
    return n if official else min(n, budget // per)


def check_selection_options(alpha: float, neighborhood: str, official: bool) -> None:
    """The data-free options of select: alpha, neighborhood and its pairing with official."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if neighborhood not in NEIGHBORHOODS:
        raise ValueError(f"neighborhood must be 'cross' or 'square', got '{neighborhood}'")
    if official and neighborhood != "cross":
        raise ValueError("official=True reproduces the release, which supports neighborhood='cross' only, "
                         f"got '{neighborhood}'")


class SelectArgs(NamedTuple):
    batch: int
    n: int
    n_anchor: int


def check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                      official) -> SelectArgs:
    n_object = check_selection_input(object_attn, num_prefix, "object_attn")
    n_deep = check_selection_input(deep_attn, num_prefix, "deep_attn")
    if object_attn.shape[0] != deep_attn.shape[0]:
        raise ValueError(f"deep_attn batch {deep_attn.shape[0]} does not match object_attn batch "
                         f"{object_attn.shape[0]}")
    if object_attn.device != deep_attn.device:
        raise ValueError(f"deep_attn is on {deep_attn.device} but object_attn is on {object_attn.device}")
    if n_object != n_deep:
        raise ValueError(f"deep_attn has {n_deep} patch tokens but object_attn has {n_object}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_h and grid_w must be positive, got {grid_h} x {grid_w}")
    if grid_h * grid_w != n_object:
        raise ValueError(f"grid_h * grid_w = {grid_h} * {grid_w} must equal the number of patch tokens "
                         f"N = {n_object}")
    if n_object >= 2**31:
        raise ValueError(f"object_attn has too many patch tokens: {n_object}")
    if not 1 <= budget <= n_object:
        raise ValueError(f"budget must be in [1, N] = [1, {n_object}], got {budget}")
    check_selection_options(alpha, neighborhood, official)
    return SelectArgs(object_attn.shape[0], n_object, anchor_count(budget, alpha, neighborhood, official))


def check_prune_features(features: torch.Tensor, args: SelectArgs, object_attn: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C), got {features.dim()}-D")
    if features.shape[0] != args.batch:
        raise ValueError(f"features batch {features.shape[0]} does not match object_attn batch {args.batch}")
    if features.shape[1] != args.n:
        raise ValueError(f"features has {features.shape[1]} tokens but the grid has N = {args.n}")
    if features.device != object_attn.device:
        raise ValueError(f"features is on {features.device} but object_attn is on {object_attn.device}")


def official_overflow_message(kept: int, budget: int) -> str:
    return f"official=True keeps {kept} anchors and buffers, more than budget {budget}; raise budget or lower alpha"


def check_qk_lse(q: torch.Tensor, packed: bool, lse) -> None:
    """The optional lse of qk_scores: float32 on q's device, (B, H, L) dense or (H, T) packed, any strides."""
    if lse is None:
        return
    expected = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[1], q.shape[2])
    if tuple(lse.shape) != expected:
        layout = "(H, T)" if packed else "(B, H, L)"
        raise ValueError(f"lse must be {layout} = {expected} for q of shape {tuple(q.shape)}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")


def check_qk_args(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, cu_seqlens, lse=None) -> None:
    """Checks of qk_scores. Values of cu_seqlens are checked only on the CPU (reading them on a GPU would sync)."""
    packed = cu_seqlens is not None
    rank = 3 if packed else 4
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, H, L, D)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {layout}, got {t.dim()}-D")
        check_float_dtype(t, name)
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} must equal q dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if q.shape[1] < 1 or q.shape[-1] < 1:
        raise ValueError(f"q must have at least one head and one channel, got shape {tuple(q.shape)}")
    if not packed:
        if not 0 <= num_prefix < q.shape[2]:
            raise ValueError(f"num_prefix must be in [0, L - 1] = [0, {q.shape[2] - 1}], got {num_prefix}")
        check_qk_lse(q, False, lse)
        return
    if num_prefix != 0:
        raise ValueError(f"num_prefix must be 0 with cu_seqlens (packed sequences), got {num_prefix}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    check_qk_lse(q, True, lse)
    if cu_seqlens.device.type == "cpu" and not isinstance(cu_seqlens, torch._subclasses.FakeTensor):
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {q.shape[0]}, got {bounds[0]} .. {bounds[-1]}")
        if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")


class PromptArgs(NamedTuple):
    batch: int
    n: int
    channels: int
    kept: int


def check_prompt_args(features, prompt, indices, roles, extra) -> PromptArgs:
    """Shapes, dtypes, devices and extra of prompt_select, as csrc/include/hiprune/checks.h checks them."""
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C), got {features.dim()}-D")
    check_float_dtype(features, "features")
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (B, C), got {prompt.dim()}-D")
    check_float_dtype(prompt, "prompt")
    if indices.dim() != 2:
        raise ValueError(f"indices must be (B, kept), got {indices.dim()}-D")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if roles.dtype != torch.int8:
        raise TypeError(f"roles must be int8, got {roles.dtype}")
    batch, n, channels = features.shape
    if prompt.shape[0] != batch:
        raise ValueError(f"prompt batch {prompt.shape[0]} does not match features batch {batch}")
    if prompt.shape[1] != channels:
        raise ValueError(f"prompt has {prompt.shape[1]} channels but features has {channels}")
    if indices.shape[0] != batch:
        raise ValueError(f"indices batch {indices.shape[0]} does not match features batch {batch}")
    if roles.shape != indices.shape:
        raise ValueError(f"roles shape {tuple(roles.shape)} must equal indices shape {tuple(indices.shape)}")
    for name, t in (("prompt", prompt), ("indices", indices), ("roles", roles)):
        if t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features is on {features.device}")
    if n >= 2**31:
        raise ValueError(f"features has too many tokens: {n}")
    kept = indices.shape[1]
    if kept > n:
        raise ValueError(f"indices has {kept} kept tokens but features has only N = {n}")
    if not 0 <= extra <= n - kept:
        raise ValueError(f"extra must be in [0, N - kept] = [0, {n - kept}], got {extra}")
    return PromptArgs(batch, n, channels, kept)


def check_prompt_index_values(indices: torch.Tensor, n: int) -> None:
    """Each row of kept indices strictly increasing in [0, N - 1]; read on the CPU only (on a GPU it would sync)."""
    if indices.device.type != "cpu" or isinstance(indices, torch._subclasses.FakeTensor):
        return
    if indices.numel() == 0 or bool((indices[:, 0] >= 0).all() & (indices[:, -1] < n).all()
                                    & (indices[:, 1:] > indices[:, :-1]).all()):
        return
    for r, row in enumerate(indices.tolist()):  # the first offending row, for the message
        previous = -1
        for i in row:
            if not previous < i < n:
                raise ValueError(f"indices must be strictly increasing in [0, N - 1] = [0, {n - 1}], row {r} has "
                                 f"{i} after {previous}")
            previous = i


def prompt_extra_count(kept: int, n: int, beta: float = 0.1, has_text: bool = True) -> int:
    """HiPrune++'s added tokens: round_half_even(beta * kept), at most the n - kept tokens left; 0 without text."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0 <= kept <= n:
        raise ValueError(f"kept must be in [0, n] = [0, {n}], got {kept}")
    if not has_text:
        return 0
    return min(round_half_even(beta * kept), n - kept)
