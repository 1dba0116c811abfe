"""The public ops, with their fake (meta) kernels beside them.

Each wrapper takes the arguments of docs/ops.md and a `backend` keyword: "auto" (default, or
HIPRUNE_BACKEND), "cpp", "triton" or "torch". The C++ ops are also reachable as torch.ops.hiprune.<op>.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _validation as v
from . import reference
from .backend import extension_loaded, resolve


def _implementation(op: str, backend: Optional[str], device: torch.device) -> Callable:
    chosen = resolve(backend, op, device)
    if chosen == "cpp":
        return getattr(torch.ops.hiprune, op)
    if chosen == "triton":
        return getattr(torch.ops.hiprune_triton, op)
    return getattr(reference, op)


def attention_scores(attn: torch.Tensor, num_prefix: int = 0, *, backend: Optional[str] = None) -> torch.Tensor:
    """Received attention of each patch token: (B, H, L, L) maps -> (B, L - num_prefix) float32.

    scores[b, j] is the mean over heads and all L query rows (prefix rows included) of attn[b, h, q, num_prefix + j].
    Every backend sums in float64 and rounds the mean once, so they agree bit for bit.
    """
    return _implementation("attention_scores", backend, attn.device)(attn, num_prefix)


def qk_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 0,
              cu_seqlens: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """attention_scores(softmax(q @ k^T * scale), num_prefix) without the (L, L) map: O(B * H * L) extra memory.

    q, k: (B, H, L, D) -> (B, L - num_prefix) float32. Packed: q, k (T, H, D) with int32 cu_seqlens (S + 1,),
    attention inside each segment, num_prefix 0 -> (T,) float32, each token averaged over its segment's queries.

    lse (optional): float32, the natural-log log-sum-exp of each query row's scaled logits over the keys it
    attends to, as the attention forward already computed it: (B, H, L) dense, (H, T) packed (the layouts of
    torch's flash attention and of flash-attn's varlen kernel; any strides). With it, one pass over q and k gives
    the same scores (to float32 tolerance) instead of two. The kernels trust its values.
    """
    return _implementation("qk_scores", backend, q.device)(q, k, scale, num_prefix, cu_seqlens, lse)


def select(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
           alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross", official: bool = False, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """HiPrune's kept tokens: int64 (B, budget), strictly increasing indices into the grid_h * grid_w patches.

    object_attn / deep_attn: (B, H, L, L) attention maps (reduced here, fused) or (B, N) scores. Anchors are the
    round_half_even(budget * alpha / per) best object scores (capped at budget // per; per = 5 for "cross",
    9 for "square"), buffers their on-grid neighbours, registers the best deep scores among the rest. Ties go to
    the lower index; NaN ranks last. official=True reproduces the authors' release (clamped flat neighbours, no cap).
    """
    return _implementation("select", backend, object_attn.device)(
        object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official)


def select_with_roles(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
                      alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross", official: bool = False,
                      *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """select(), plus int8 roles aligned with the indices: 0 anchor, 1 buffer, 2 register."""
    return _implementation("select_with_roles", backend, object_attn.device)(
        object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official)


def prune(features: torch.Tensor, object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int,
          grid_w: int, alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross", official: bool = False,
          *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept patch features (B, budget, C) in the features' dtype, and the indices of select()."""
    return _implementation("prune", backend, object_attn.device)(
        features, object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official)


def prompt_extra_count(kept: int, n: int, beta: float = 0.1, has_text: bool = True) -> int:
    """How many tokens HiPrune++ adds to an image whose HiPrune selection keeps `kept` of its `n` tokens:
    round_half_even(beta * kept), at most the n - kept tokens left, 0 when the prompt has no text. The language
    model then sees kept + this many tokens of the image, a number known before the encoder runs."""
    return v.prompt_extra_count(kept, n, beta, has_text)


def prompt_select(features: torch.Tensor, prompt: Optional[torch.Tensor], indices: torch.Tensor,
                  roles: torch.Tensor, beta: float = 0.1, *,
                  backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPrune++: select's (indices, roles) plus the prompt_extra_count(kept, N, beta) tokens not kept whose
    features (B, N, C) have the highest cosine similarity to the prompt embedding (B, C).

    Returns int64 indices and int8 roles (B, kept + extra), indices strictly increasing; added tokens have role 3.
    prompt=None (a prompt without text) adds nothing. Ties go to the lower index; NaN (a zero vector) ranks last.
    """
    extra = prompt_extra_count(indices.shape[1], features.shape[1], beta, has_text=prompt is not None)
    if prompt is None:  # not read when nothing is added
        prompt = features.new_zeros((features.shape[0], features.shape[2]))
    return _implementation("prompt_select", backend, features.device)(features, prompt, indices, roles, extra)


# Fake kernels: output shapes from the arguments alone, and the same argument errors as the real kernels. The
# Triton ops (hiprune_ops.triton_kernels) register these same functions as their fakes.

def attention_scores_fake(attn, num_prefix=0):
    n = v.check_attention_map(attn, num_prefix, "attn")
    return attn.new_empty((attn.shape[0], n), dtype=torch.float32)


def qk_scores_fake(q, k, scale, num_prefix=0, cu_seqlens=None, lse=None):
    v.check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse)
    shape = (q.shape[0],) if cu_seqlens is not None else (q.shape[0], q.shape[2] - num_prefix)
    return q.new_empty(shape, dtype=torch.float32)


def select_fake(object_attn, deep_attn, budget, grid_h, grid_w, alpha=0.1, num_prefix=0, neighborhood="cross",
                official=False):
    return select_with_roles_fake(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                                  official)[0]


def select_with_roles_fake(object_attn, deep_attn, budget, grid_h, grid_w, alpha=0.1, num_prefix=0,
                           neighborhood="cross", official=False):
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    return (object_attn.new_empty((args.batch, budget), dtype=torch.int64),
            object_attn.new_empty((args.batch, budget), dtype=torch.int8))


def prune_fake(features, object_attn, deep_attn, budget, grid_h, grid_w, alpha=0.1, num_prefix=0,
               neighborhood="cross", official=False):
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    v.check_prune_features(features, args, object_attn)
    return (features.new_empty((args.batch, budget, features.shape[2])),
            object_attn.new_empty((args.batch, budget), dtype=torch.int64))

def prompt_select_fake(features, prompt, indices, roles, extra):
    args = v.check_prompt_args(features, prompt, indices, roles, extra)
    shape = (args.batch, args.kept + extra)
    return indices.new_empty(shape), roles.new_empty(shape)


FAKES = {"attention_scores": attention_scores_fake, "qk_scores": qk_scores_fake, "select": select_fake,
         "select_with_roles": select_with_roles_fake, "prune": prune_fake, "prompt_select": prompt_select_fake}


# prune is differentiable in its features (a gather); the indices are discrete, so the maps get no gradient. The
# C++ op (below) and the Triton op (triton_kernels/prune.py) register this same backward.
def prune_setup_context(ctx, inputs, output):
    features = inputs[0]
    ctx.feature_shape = features.shape
    ctx.save_for_backward(output[1])


def prune_backward(ctx, grad_kept, grad_indices):
    (indices,) = ctx.saved_tensors
    grad_features = grad_kept.new_zeros(ctx.feature_shape)
    grad_features.scatter_add_(1, indices.unsqueeze(-1).expand_as(grad_kept), grad_kept)
    return (grad_features,) + (None,) * 9


if extension_loaded():
    for _op, _fake in FAKES.items():
        torch.library.register_fake(f"hiprune::{_op}", _fake)
    torch.library.register_autograd("hiprune::prune", prune_backward, setup_context=prune_setup_context)
