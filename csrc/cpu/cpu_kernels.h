// Entry points the CPU op files share with each other.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace hiprune {
namespace cpu {

// (B, H, L, L) maps -> (B, L - num_prefix) float32 column means over heads and query rows.
at::Tensor attention_scores(const at::Tensor& attn, int64_t num_prefix);

// Indices (B, budget) int64 and roles (B, budget) int8.
std::tuple<at::Tensor, at::Tensor> select_with_roles(const at::Tensor& object_attn, const at::Tensor& deep_attn,
                                                     int64_t budget, int64_t grid_h, int64_t grid_w, double alpha,
                                                     int64_t num_prefix, c10::string_view neighborhood,
                                                     bool official);

}  // namespace cpu
}  // namespace hiprune
