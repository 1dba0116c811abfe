"""hiprune_triton::select: the fused selection kernel (triton_kernels/_selection.py), indices only."""

from __future__ import annotations

import torch

from .. import ops
from ._selection import launch_select


@torch.library.triton_op("hiprune_triton::select", mutates_args=())
def select(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
           alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
           official: bool = False) -> torch.Tensor:
    """int64 (B, budget) kept indices, increasing; maps (B, H, L, L) or scores (B, N) for either input."""
    return launch_select(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official,
                         with_roles=False)[0]


# Shapes only, the same fake as torch.ops.hiprune.select (the interpreter cannot trace the op itself).
select.register_fake(ops.select_fake)
