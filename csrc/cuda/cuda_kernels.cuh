// Entry points the CUDA op files share with each other (host functions; the kernels stay in their .cu files).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace hiprune {
namespace cuda {

// (B, H, L, L) maps on a CUDA device -> (B, L - num_prefix) contiguous float32 column means over heads and query
// rows, summed in float64 and rounded once. Deterministic, asynchronous on the current stream.
at::Tensor attention_scores(const at::Tensor& attn, int64_t num_prefix);

// Indices (B, budget) int64 and roles (B, budget) int8, one block per image, asynchronous on the current stream
// (official mode reads the kept counts back only when 5 * n_anchor > budget, see select_with_roles.cu).
std::tuple<at::Tensor, at::Tensor> select_with_roles(const at::Tensor& object_attn, const at::Tensor& deep_attn,
                                                     int64_t budget, int64_t grid_h, int64_t grid_w, double alpha,
                                                     int64_t num_prefix, c10::string_view neighborhood,
                                                     bool official);

}  // namespace cuda
}  // namespace hiprune
