"""Compiles every Triton kernel of hiprune_triton for sm_90 (H100) without a GPU; prints one line per kernel.

Triton's interpreter accepts code that the compiler rejects (an early `return` inside a branch, say), so
tests/test_triton.py runs this in a subprocess with TRITON_INTERPRET unset. Exit status 1 if any kernel fails.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hiprune_ops.triton_kernels import _selection, attention_scores, prompt_select, prune, qk_scores  # noqa: E402

SELECT_POINTERS = {"obj_ptr": "*fp32", "deep_ptr": "*bf16", "role_scratch_ptr": "*i8", "indices_ptr": "*i64",
                   "roles_ptr": "*i8", "kept_ptr": "*i32"}
QK_POINTERS = {"lse_ptr": "*fp32", "colsum_ptr": "*fp32", "cu_ptr": "*i32", "scale_log2": "fp32",
               "lse_to_log2": "fp32"}
PROMPT_POINTERS = {"indices_ptr": "*i64", "slots_ptr": "*i32", "out_ptr": "*fp32", "cos_ptr": "*fp32",
                   "roles_ptr": "*i8", "out_indices_ptr": "*i64", "out_roles_ptr": "*i8"}
# Ints equal to 1 are specialised to constants by Triton: compile one variant that way too.
ONES = {"n": 1, "budget": 1, "grid_h": 1, "grid_w": 1, "n_anchor": 1, "obj_sn": 1, "deep_sn": 1}

CASES = [
    (_selection._select_kernel, SELECT_POINTERS,
     dict(SQUARE=False, OFFICIAL=True, WRITE_ROLES=True, CHUNK=64, SINGLE=True, PAIRWISE=True)),
    (_selection._select_kernel, SELECT_POINTERS,
     dict(SQUARE=True, OFFICIAL=False, WRITE_ROLES=False, CHUNK=16, SINGLE=True, PAIRWISE=True, **ONES)),
    (_selection._select_kernel, SELECT_POINTERS,
     dict(SQUARE=True, OFFICIAL=False, WRITE_ROLES=True, CHUNK=1024, SINGLE=True, PAIRWISE=False)),
    (_selection._select_kernel, SELECT_POINTERS,
     dict(SQUARE=False, OFFICIAL=True, WRITE_ROLES=True, CHUNK=1024, SINGLE=False, PAIRWISE=False)),
    (attention_scores._column_sums_kernel, {"attn_ptr": "*bf16", "out_ptr": "*fp32", "partial_ptr": "*fp64"},
     dict(BLOCK_R=32, BLOCK_N=128, FINAL=False)),
    (attention_scores._finish_kernel, {"partial_ptr": "*fp64", "out_ptr": "*fp32"}, dict(BLOCK_N=128)),
    # The qk kernels are autotuned: compile their JIT functions with block sizes of the tuning space, for head
    # dims 80 (two dots, 64 + 16) and 128 (one), bf16 / fp16 on tensor cores and fp32, dense and packed.
    (qk_scores._row_lse_kernel.fn, {"q_ptr": "*bf16", "k_ptr": "*bf16", **QK_POINTERS},
     dict(VARLEN=False, BLOCK_D0=64, BLOCK_D1=16, PRECISION="tf32", UPCAST=False, BLOCK_M=128, BLOCK_N=64)),
    (qk_scores._row_lse_kernel.fn, {"q_ptr": "*fp16", "k_ptr": "*fp16", **QK_POINTERS},
     dict(VARLEN=True, BLOCK_D0=128, BLOCK_D1=0, PRECISION="tf32", UPCAST=False, BLOCK_M=64, BLOCK_N=64)),
    (qk_scores._column_sums_kernel.fn, {"q_ptr": "*bf16", "k_ptr": "*bf16", **QK_POINTERS},
     dict(VARLEN=False, BLOCK_D0=64, BLOCK_D1=16, PRECISION="tf32", UPCAST=False, BLOCK_M=64, BLOCK_N=128)),
    (qk_scores._column_sums_kernel.fn, {"q_ptr": "*fp32", "k_ptr": "*fp32", **QK_POINTERS},
     dict(VARLEN=True, BLOCK_D0=64, BLOCK_D1=32, PRECISION="ieee", UPCAST=False, BLOCK_M=32, BLOCK_N=64)),
    (prune._gather_rows_kernel, {"features_ptr": "*fp16", "indices_ptr": "*i64", "out_ptr": "*fp16"},
     dict(BLOCK_K=16, BLOCK_C=128)),
    (prompt_select._mark_kept_kernel, PROMPT_POINTERS, dict(CHUNK=256)),
    (prompt_select._cosine_kernel, {**PROMPT_POINTERS, "f_ptr": "*bf16", "p_ptr": "*fp16"},
     dict(BLOCK_N=16, BLOCK_C=128)),
    (prompt_select._cosine_kernel, {**PROMPT_POINTERS, "f_ptr": "*fp32", "p_ptr": "*fp32"},
     dict(BLOCK_N=16, BLOCK_C=128)),
    (prompt_select._merge_kernel, PROMPT_POINTERS, dict(CHUNK=64, SINGLE=True, PAIRWISE=True)),
    (prompt_select._merge_kernel, PROMPT_POINTERS, dict(CHUNK=1024, SINGLE=True, PAIRWISE=False)),
    (prompt_select._merge_kernel, PROMPT_POINTERS, dict(CHUNK=1024, SINGLE=False, PAIRWISE=False)),
]


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, types, constants in CASES:
        signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
        constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
        try:
            triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target)
            print("ok", kernel.fn.__name__, constants)
        except Exception as error:  # report every kernel, then fail
            failed += 1
            cause = error.__cause__ or error
            print("FAILED", kernel.fn.__name__, constants, f"{type(cause).__name__}: {cause}"[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
