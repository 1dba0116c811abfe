// select and prune on top of one backend's select_with_roles (host side). Each backend's op files register these
// with its own select_with_roles, so the two ops cannot drift apart between CPU and CUDA.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "hiprune/checks.h"

namespace hiprune {

using SelectWithRolesFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, int64_t,
                                                                  int64_t, int64_t, double, int64_t,
                                                                  c10::string_view, bool);

template <SelectWithRolesFn select_with_roles>
at::Tensor select_via(const at::Tensor& object_attn, const at::Tensor& deep_attn, int64_t budget, int64_t grid_h,
                      int64_t grid_w, double alpha, int64_t num_prefix, c10::string_view neighborhood, bool official) {
  return std::get<0>(select_with_roles(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix,
                                       neighborhood, official));
}

// Select, then gather the kept patch features on the features' device.
template <SelectWithRolesFn select_with_roles>
std::tuple<at::Tensor, at::Tensor> prune_via(const at::Tensor& features, const at::Tensor& object_attn,
                                             const at::Tensor& deep_attn, int64_t budget, int64_t grid_h,
                                             int64_t grid_w, double alpha, int64_t num_prefix,
                                             c10::string_view neighborhood, bool official) {
  const SelectArgs args =
      check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official);
  check_prune_features(features, args, object_attn);
  at::Tensor indices = select_via<select_with_roles>(object_attn, deep_attn, budget, grid_h, grid_w, alpha,
                                                     num_prefix, neighborhood, official);
  at::Tensor kept = at::gather(features, 1, indices.unsqueeze(-1).expand({-1, -1, features.size(2)}));
  return {kept, indices};
}

}  // namespace hiprune
