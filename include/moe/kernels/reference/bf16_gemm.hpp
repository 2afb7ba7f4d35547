#pragma once
/// @file kernels/reference/bf16_gemm.hpp
/// @brief The values the bf16 kernel (kernels/simd/bf16_gemm.hpp) computes with, derived independently:
/// the test oracle multiplies these in double (RELIABILITY.md N4).

#include <cmath>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// v rounded to the nearest bf16 (8 significant bits, ties to even), in double. Normal range only.
inline double round_to_bf16(double v) {
  if (v == 0.0) return 0.0;
  int e = 0;
  const double m = std::frexp(v, &e);  // v = m 2^e, |m| in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
}

/// out (n) = bf16 image of in (n).
template <class S>
void bf16_image(const S* in, Index n, double* out) {
  for (Index i = 0; i < n; ++i) out[i] = round_to_bf16(static_cast<double>(in[i]));
}

}  // namespace moe::kernels::reference
