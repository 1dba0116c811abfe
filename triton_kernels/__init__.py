"""Triton kernels of every hiprune op, registered as torch.ops.hiprune_triton.<op> on import.

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported). Each op is
a torch.library.triton_op, so torch.compile(fullgraph=True) traces through its kernel launches.
"""

# Imported for their registrations.
from . import attention_scores, prompt_select, prune, qk_scores, select, select_with_roles  # noqa: F401
