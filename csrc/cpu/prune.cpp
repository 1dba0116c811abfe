// CPU kernel of hiprune::prune: the CPU selection, then at::gather of the kept patch features.
#include <torch/library.h>

#include "cpu_kernels.h"
#include "hiprune/composites.h"

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("prune", &hiprune::prune_via<&hiprune::cpu::select_with_roles>); }
