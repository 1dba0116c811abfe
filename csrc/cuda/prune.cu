// CUDA kernel of hiprune::prune: select on the device, then gather the kept patch features there (at::gather on
// the current stream; no host synchronisation).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_kernels.cuh"
#include "hiprune/checks.h"

namespace hiprune {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> prune(const at::Tensor& features, const at::Tensor& object_attn,
                                         const at::Tensor& deep_attn, int64_t budget, int64_t grid_h, int64_t grid_w,
                                         double alpha, int64_t num_prefix, c10::string_view neighborhood,
                                         bool official) {
  const SelectArgs args =
      check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official);
  check_prune_features(features, args, object_attn);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor indices = std::get<0>(select_with_roles(object_attn, deep_attn, budget, grid_h, grid_w, alpha,
                                                     num_prefix, neighborhood, official));
  at::Tensor kept = at::gather(features, 1, indices.unsqueeze(-1).expand({-1, -1, features.size(2)}));
  return {kept, indices};
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("prune", &hiprune::cuda::prune); }
