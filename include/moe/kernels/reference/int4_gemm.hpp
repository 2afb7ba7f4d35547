#pragma once
/// @file kernels/reference/int4_gemm.hpp
/// @brief The values the 4-bit kernel (kernels/simd/int4_gemm.hpp) computes with, derived independently in
/// double: per group of `group` elements, d = m / −8 with m the first element of largest magnitude (in f32,
/// as the format defines it), q = clamp(round(w / d), −8, 7) ties to even, image q · d rounded to f16 or not.

#include <algorithm>
#include <cmath>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// v rounded to the nearest f16 (11 significant bits, subnormals in steps of 2^-24, ties to even), saturated at
/// ±65504.
inline double round_to_f16(double v) {
  if (v == 0.0) return 0.0;
  int e = 0;
  std::frexp(v, &e);                          // |v| in [2^(e-1), 2^e)
  const int quantum = std::max(e - 11, -24);  // exponent of the last kept bit
  const double r = std::ldexp(std::nearbyint(std::ldexp(v, -quantum)), quantum);
  return std::clamp(r, -65504.0, 65504.0);
}

/// out (n) = 4-bit image of in (n), one scale per `group` elements (the last group may be short).
inline void int4_image(const float* in, Index n, Index group, bool f16_scales, double* out) {
  for (Index g0 = 0; g0 < n; g0 += group) {
    const Index g1 = std::min(n, g0 + group);
    float m = 0.0f;
    for (Index i = g0; i < g1; ++i)
      if (std::fabs(in[i]) > std::fabs(m)) m = in[i];
    const float d = m / -8.0f;
    const double ds = f16_scales ? round_to_f16(d) : static_cast<double>(d);
    for (Index i = g0; i < g1; ++i) {
      const float q = d == 0.0f ? 0.0f : std::fmin(7.0f, std::fmax(-8.0f, std::nearbyint(in[i] / d)));
      out[i] = static_cast<double>(q) * ds;
    }
  }
}

}  // namespace moe::kernels::reference
