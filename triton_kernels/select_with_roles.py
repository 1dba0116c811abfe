"""hiprune_triton::select_with_roles: the fused selection kernel (triton_kernels/_selection.py), with roles."""

from __future__ import annotations

import torch

from .. import ops
from ._selection import launch_select


@torch.library.triton_op("hiprune_triton::select_with_roles", mutates_args=())
def select_with_roles(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
                      alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
                      official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """select's indices and int8 roles aligned with them: 0 anchor, 1 buffer, 2 register."""
    return launch_select(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official,
                         with_roles=True)


# Shapes only, the same fake as torch.ops.hiprune.select_with_roles (the interpreter cannot trace the op itself).
select_with_roles.register_fake(ops.select_with_roles_fake)
