#pragma once
// Runs a check under several OpenMP thread counts (1, 2, 3, 4), restoring the setting afterwards; without
// OpenMP it runs the check twice (a repeat-determinism check).

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::test {

template <class F>
void for_each_thread_count(F&& f) {
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3, 4}) {
    omp_set_num_threads(threads);
    f(threads);
  }
  omp_set_num_threads(saved);
#else
  for (int repeat = 0; repeat < 2; ++repeat) f(1);
#endif
}

}  // namespace moe::test
