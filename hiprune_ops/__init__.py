"""hiprune-ops: HiPrune visual-token pruning as fused torch custom ops (torch.ops.hiprune.*)."""

from . import reference
from .backend import extension_loaded
from .ops import (attention_scores, prompt_extra_count, prompt_select, prune, qk_scores, select,
                  select_with_roles)


def __getattr__(name):
    # The transformers integration is imported on first use, so the ops never pay for importing transformers.
    if name in ("apply_hiprune", "remove_hiprune", "encode"):
        from . import integrations
        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention_scores", "qk_scores", "select", "select_with_roles", "prune", "prompt_select", "prompt_extra_count",
    "reference", "extension_loaded",
    "apply_hiprune", "remove_hiprune", "encode",
]
__version__ = "0.1.0"
