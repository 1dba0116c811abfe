// CUDA kernel of hiprune::select: the CUDA select_with_roles, without its roles.
#include <torch/library.h>

#include "cuda_kernels.cuh"
#include "hiprune/composites.h"

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("select", &hiprune::select_via<&hiprune::cuda::select_with_roles>); }
