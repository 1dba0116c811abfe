"""make test-sdist: run by the python of a fresh venv where the sdist was installed, outside the source tree.

Checks that the installed package imports, that its extension was built (CPU kernels) for this torch, and that a
C++ kernel agrees with the torch reference.
"""

import os

import torch

import hiprune_ops
from hiprune_ops.backend import built_for_torch, has_cpp_kernel

assert "site-packages" in hiprune_ops.__file__, f"imported from the source tree: {hiprune_ops.__file__}"
assert hiprune_ops.extension_loaded(), "hiprune_ops._C was not built or does not load"
assert built_for_torch() == torch.__version__, (built_for_torch(), torch.__version__)
for op in ("attention_scores", "qk_scores", "select", "select_with_roles", "prune", "prompt_select"):
    assert has_cpp_kernel(op, "cpu"), f"no CPU kernel of hiprune::{op}"
attn = torch.softmax(torch.randn(2, 3, 17, 17), dim=-1)
expected = hiprune_ops.reference.select(attn, attn.flip(-1), 6, 4, 4, 0.5, 1)
assert torch.equal(hiprune_ops.select(attn, attn.flip(-1), 6, 4, 4, 0.5, 1, backend="cpp"), expected)
triton_dir = os.path.join(os.path.dirname(hiprune_ops.__file__), "triton_kernels")
assert os.path.exists(os.path.join(triton_dir, "__init__.py")), "hiprune_ops.triton_kernels not installed"
print(f"hiprune_ops {hiprune_ops.__version__} installed from the sdist, CPU kernels built for torch "
      f"{torch.__version__}")
