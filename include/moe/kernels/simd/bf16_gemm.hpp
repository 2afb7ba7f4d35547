#pragma once
/// @file kernels/simd/bf16_gemm.hpp
/// @brief bf16 weight storage for panel_gemm: weights and activations rounded to bf16, products summed in
/// f32 by AVX512-BF16 `vdpbf16ps` (two k elements per lane and step), or by a scalar loop elsewhere.
///
/// Panel layout (steps = ceil(k / 2), width, 2): each 32-bit lane holds the bf16 pair (k = 2q, 2q + 1) of one
/// column, the operand order of vdpbf16ps. An activation row is (2 · steps) bf16, its pairs broadcast as one
/// 32-bit value. Halves the weight bytes of f32 (decode is bandwidth-bound) and doubles the f32 FMA peak.
/// AVX2 has no bf16 dot product: each weight register is widened (a bf16 is the high half of its f32: shift
/// the even element up, mask the odd one) and fed to FMA, the even element first as on the portable path.

#include <bit>
#include <cstdint>
#include <cstring>

#include "panel_gemm.hpp"

#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// f32 -> bf16 bits, round to nearest even (NaN is not expected: the layer rejects non-finite input).
inline std::uint16_t to_bf16(float v) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(v);
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/// bf16 bits -> f32 (exact).
inline float from_bf16(std::uint16_t b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

}  // namespace detail

/// Storage kernel for bf16 weights (T = float).
template <class T, class Arch>
struct BF16Panels {
  static_assert(std::is_same_v<T, float>, "moe::kernels::BF16Weights: the bank's scalar type must be float");
  using Weight = std::uint16_t;  ///< bf16 bits
  using Input = std::uint16_t;   ///< bf16 bits
  using Out = float;
  static constexpr Index width = detail::panel_width<float, Arch>();
  /// AVX2: 4 rows (8 accumulators + 4 widened weight registers + 2 broadcasts fit the 16 registers).
  static constexpr int rows = detail::is_avx2<Arch> ? 4 : detail::panel_rows<float, Arch>();
  static constexpr Index group = 2;
  static constexpr bool quantized = false;
  static constexpr bool row_scaled = false;
  static constexpr bool blocked = false;

  template <class S>
  static float column_scale(const S*, Index) {
    return 1.0f;
  }
  template <class S>
  static Weight encode(S v, float) {
    return detail::to_bf16(static_cast<float>(v));
  }
  /// out (n_pad) = bf16(in (n)), zero past n. Returns 1 (no scale).
  static float encode_row(const float* in, Index n, Index n_pad, Input* out) {
    for (Index i = 0; i < n; ++i) out[i] = detail::to_bf16(in[i]);
    for (Index i = n; i < n_pad; ++i) out[i] = 0;
    return 1.0f;
  }

  /// tile (R, width) = bf16 rows xr[0..R) times one panel over `steps` pairs.
  template <int R>
  static void run(const Input* const* xr, const float*, const Weight* panel, Index steps, const float*,
                  const std::int32_t*, Out* tile) {
#if defined(__AVX512BF16__)
    if constexpr (detail::is_avx512<Arch>) {
      __m512 acc[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (Index q = 0; q < steps; ++q) {
        const Weight* b = panel + q * width * 2;
        detail::prefetch_step<width * 2 * sizeof(Weight)>(b);
        const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 32);
        for (int r = 0; r < R; ++r) {
          std::uint32_t pair;
          std::memcpy(&pair, xr[r] + 2 * q, sizeof pair);
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_store_ps(tile + r * width, acc[r][0]);
        _mm512_store_ps(tile + r * width + 16, acc[r][1]);
      }
      return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (detail::is_avx2<Arch>) {
      const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      __m256 acc[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (Index q = 0; q < steps; ++q) {
        const Weight* b = panel + q * width * 2;
        detail::prefetch_step<width * 2 * sizeof(Weight)>(b);
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
        for (int r = 0; r < R; ++r) {
          std::uint32_t pair;  // widened like the weights: one broadcast per row and step
          std::memcpy(&pair, xr[r] + 2 * q, sizeof pair);
          const __m256i x = _mm256_set1_epi32(static_cast<int>(pair));
          const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
          const __m256 a1 = _mm256_castsi256_ps(_mm256_and_si256(x, odd));
          acc[r][0] = _mm256_fmadd_ps(a1, o0, _mm256_fmadd_ps(a0, e0, acc[r][0]));
          acc[r][1] = _mm256_fmadd_ps(a1, o1, _mm256_fmadd_ps(a0, e1, acc[r][1]));
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(tile + r * width, acc[r][0]);
        _mm256_storeu_ps(tile + r * width + 8, acc[r][1]);
      }
      return;
    }
#endif
    // Portable path: the same pairs, the even element first, in f32.
    float acc[R][width] = {};  // (R, width)
    for (Index q = 0; q < steps; ++q) {
      const Weight* b = panel + q * width * 2;
      for (int r = 0; r < R; ++r) {
        const float a0 = detail::from_bf16(xr[r][2 * q]), a1 = detail::from_bf16(xr[r][2 * q + 1]);
        for (Index c = 0; c < width; ++c) {
          acc[r][c] = detail::fmadd(a1, detail::from_bf16(b[2 * c + 1]),
                                    detail::fmadd(a0, detail::from_bf16(b[2 * c]), acc[r][c]));
        }
      }
    }
    for (int r = 0; r < R; ++r) std::copy_n(acc[r], width, tile + r * width);
  }
};

/// Weight storage policy: bf16 weights and activations, f32 accumulation (vdpbf16ps where available).
struct BF16Weights {
  static constexpr const char* name() { return "bf16"; }
  template <class T, class Arch>
  using kernel = BF16Panels<T, Arch>;
};

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
