#pragma once
/// @file kernels/reference/softmax.hpp
/// @brief Plain-loop row softmax: the test oracle for kernels/simd/softmax.hpp (instantiate with double).

#include <cmath>
#include <limits>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// Numerically stable softmax of one row: out[i] = exp(in[i] - max) / sum_j exp(in[j] - max).
///
/// Non-finite policy (shared with the SIMD kernel): NaN entries count as -inf; if the max is +inf the
/// +inf entries share weight 1/count(+inf) and every other entry gets 0; if no entry is above -inf the
/// whole row is 0. The output never contains NaN for such inputs.
/// @tparam T float or double
/// @param in row of n logits; may equal `out`
/// @param out row of n probabilities
/// @param n row length; 0 is a no-op
template <class T>
void softmax_row(const T* in, T* out, Index n) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  T max = -inf;
  for (Index i = 0; i < n; ++i) {
    if (in[i] > max) max = in[i];  // a NaN compares false, so it never becomes the max
  }
  if (max == -inf) {
    for (Index i = 0; i < n; ++i) out[i] = T(0);
    return;
  }
  if (max == inf) {
    Index count = 0;
    for (Index i = 0; i < n; ++i) count += in[i] == inf ? 1 : 0;
    const T share = T(1) / static_cast<T>(count);
    for (Index i = 0; i < n; ++i) out[i] = in[i] == inf ? share : T(0);
    return;
  }
  T sum = 0;
  for (Index i = 0; i < n; ++i) {
    const T e = std::isnan(in[i]) ? T(0) : std::exp(in[i] - max);
    out[i] = e;
    sum += e;
  }
  for (Index i = 0; i < n; ++i) out[i] /= sum;
}

}  // namespace moe::kernels::reference
