// CUDA kernel of hiprune::prune: the CUDA selection, then at::gather of the kept patch features on the device
// (asynchronous: no host synchronisation).
#include <torch/library.h>

#include "cuda_kernels.cuh"
#include "hiprune/composites.h"

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("prune", &hiprune::prune_via<&hiprune::cuda::select_with_roles>); }
