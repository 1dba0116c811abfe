// CPU kernel of hiprune::select: the CPU select_with_roles, without its roles.
#include <torch/library.h>

#include "cpu_kernels.h"
#include "hiprune/composites.h"

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("select", &hiprune::select_via<&hiprune::cpu::select_with_roles>); }
