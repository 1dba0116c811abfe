"""A do-nothing Triton kernel: backend.triton_usable asks torch.library.wrap_triton whether it takes it."""

import triton


@triton.jit
def probe_kernel(x):
    pass
