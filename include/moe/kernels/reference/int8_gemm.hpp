#pragma once
/// @file kernels/reference/int8_gemm.hpp
/// @brief The values the int8 kernel (kernels/simd/int8_gemm.hpp) computes with: symmetric quantisation of a
/// vector (a weight row = one output channel, or an activation row) with scale s = max |v| / 127 and
/// q = round(v / s) (ties to even), both in f32 as the format defines them; the image is q · s in double.

#include <cmath>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// out (n) = dequantised int8 image of in (n), one scale for the whole vector.
inline void int8_image(const float* in, Index n, double* out) {
  float m = 0.0f;
  for (Index i = 0; i < n; ++i) m = std::fmax(m, std::fabs(in[i]));
  const float s = m / 127.0f;
  for (Index i = 0; i < n; ++i) {
    const float q = s == 0.0f ? 0.0f : std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(in[i] / s)));
    out[i] = static_cast<double>(q) * static_cast<double>(s);
  }
}

}  // namespace moe::kernels::reference
