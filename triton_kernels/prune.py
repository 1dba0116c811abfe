"""hiprune_triton::prune: the fused selection kernel, then a gather of the kept feature rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .. import ops
from ._common import interpreting
from ._selection import launch_select


@triton.jit
def _gather_rows_kernel(features_ptr, indices_ptr, out_ptr, budget, channels, s_b, s_n, s_c, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    chans = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    slot_mask = slots < budget
    mask = slot_mask[:, None] & (chans < channels)[None, :]
    tokens = tl.load(indices_ptr + b * budget + slots, mask=slot_mask, other=0)
    x = tl.load(features_ptr + b * s_b + (tokens * s_n)[:, None] + (chans * s_c)[None, :], mask=mask)
    tl.store(out_ptr + (b * budget + slots.to(tl.int64))[:, None] * channels + chans[None, :], x, mask=mask)


@torch.library.triton_op("hiprune_triton::prune", mutates_args=())
def prune(features: torch.Tensor, object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int,
          grid_w: int, alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
          official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features at select's indices (B, budget, C) in the features' dtype, the indices)."""
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    v.check_prune_features(features, args, object_attn)
    indices, _ = launch_select(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official, with_roles=False)
    channels = features.shape[2]
    out = torch.empty((args.batch, budget, channels), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out, indices
    block_k, block_c = (16, 32) if interpreting() else (16, 128)
    grid = (args.batch, triton.cdiv(budget, block_k), triton.cdiv(channels, block_c))
    torch.library.wrap_triton(_gather_rows_kernel)[grid](
        features, indices, out, budget, channels, features.stride(0), features.stride(1), features.stride(2),
        BLOCK_K=block_k, BLOCK_C=block_c)
    return out, indices


# Shapes only, the same fake as torch.ops.hiprune.prune (the interpreter cannot trace the op itself).
prune.register_fake(ops.prune_fake)
# The same backward as torch.ops.hiprune.prune: differentiable in features, whichever backend ran.
prune.register_autograd(ops.prune_backward, setup_context=ops.prune_setup_context)
