"""hiprune-ops: HiPrune visual-token pruning as fused torch custom ops (torch.ops.hiprune.*)."""

from . import reference
from .backend import extension_loaded
from .ops import attention_scores, prune, qk_scores, select, select_with_roles

__all__ = [
    "attention_scores", "qk_scores", "select", "select_with_roles", "prune", "reference", "extension_loaded",
]
__version__ = "0.1.0"
