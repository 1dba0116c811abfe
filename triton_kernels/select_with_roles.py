"""hiprune_triton::select_with_roles: the fused selection kernel (triton_kernels/_selection.py), with roles."""

from __future__ import annotations

import torch

from .. import _validation as v
from ._selection import launch_select


@torch.library.triton_op("hiprune_triton::select_with_roles", mutates_args=())
def select_with_roles(object_attn: torch.Tensor, deep_attn: torch.Tensor, budget: int, grid_h: int, grid_w: int,
                      alpha: float = 0.1, num_prefix: int = 0, neighborhood: str = "cross",
                      official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """select's indices and int8 roles aligned with them: 0 anchor, 1 buffer, 2 register."""
    return launch_select(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official,
                         with_roles=True)


# Shapes only (also the interpreter's path: wrap_triton hands interpreted kernels over as they are, so the
# triton_op's own function cannot serve as its fake there).
@select_with_roles.register_fake
def _(object_attn, deep_attn, budget, grid_h, grid_w, alpha=0.1, num_prefix=0, neighborhood="cross", official=False):
    args = v.check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood,
                               official)
    return (object_attn.new_empty((args.batch, budget), dtype=torch.int64),
            object_attn.new_empty((args.batch, budget), dtype=torch.int8))
