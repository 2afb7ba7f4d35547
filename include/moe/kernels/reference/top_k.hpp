#pragma once
/// @file kernels/reference/top_k.hpp
/// @brief Plain-loop top-k selection: the test oracle for kernels/simd/top_k.hpp.

#include <cassert>
#include <cmath>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// True when (a, id_a) ranks before (b, id_b): the larger score first, NaN below everything (also
/// -inf), -0.0 == +0.0, and on equal scores (or two NaNs) the lower id first.
template <class T>
bool top_k_ranks_before(T a, Index id_a, T b, Index id_b) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return id_a < id_b;
}

/// The ids of the k largest scores, by insertion into a sorted list of size k.
/// @tparam T float or double
/// @param scores n scores
/// @param n number of scores (e.g. n_experts)
/// @param k number of ids to select; precondition 1 <= k <= n (the caller validates)
/// @param ids output, k ids ordered by descending score; ties rank the lower id first, NaN last
template <class T>
void top_k(const T* scores, Index n, Index k, Index* ids) {
  assert(k >= 1 && k <= n);
  Index size = 0;  // ids[0, size) is sorted best-first
  for (Index i = 0; i < n; ++i) {
    if (size == k && !top_k_ranks_before(scores[i], i, scores[ids[k - 1]], ids[k - 1])) continue;
    Index pos = size < k ? size++ : k - 1;
    while (pos > 0 && top_k_ranks_before(scores[i], i, scores[ids[pos - 1]], ids[pos - 1])) {
      ids[pos] = ids[pos - 1];
      --pos;
    }
    ids[pos] = i;
  }
}

}  // namespace moe::kernels::reference
