#pragma once
/// @file detail/parallel.hpp
/// @brief OpenMP glue. Without -fopenmp the pragmas vanish and everything runs serially.

#if defined(_OPENMP)
#include <omp.h>
#define MOE_OMP(directive) _Pragma(#directive)
#else
#define MOE_OMP(directive)
#endif

namespace moe::detail {

/// Threads an OpenMP parallel region would use here (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace moe::detail
