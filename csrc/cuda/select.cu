// CUDA kernel of hiprune::select: the selection of select_with_roles (one block per image), without its roles.
#include <torch/library.h>

#include "cuda_kernels.cuh"

namespace hiprune {
namespace cuda {

at::Tensor select(const at::Tensor& object_attn, const at::Tensor& deep_attn, int64_t budget, int64_t grid_h,
                  int64_t grid_w, double alpha, int64_t num_prefix, c10::string_view neighborhood, bool official) {
  return std::get<0>(select_with_roles(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix,
                                       neighborhood, official));
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("select", &hiprune::cuda::select); }
