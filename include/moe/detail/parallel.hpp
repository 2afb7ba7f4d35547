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

/// Multiply-adds (or element copies) below which a loop runs on the calling thread: a parallel region
/// costs microseconds, and far more when another process holds a core and the team waits for a
/// descheduled thread. Results do not depend on it (each element is computed the same way either way).
inline constexpr double k_parallel_min_work = 1 << 16;

/// Threads an OpenMP parallel region would use here (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace moe::detail
