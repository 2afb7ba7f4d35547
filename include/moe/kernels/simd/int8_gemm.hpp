#pragma once
/// @file kernels/simd/int8_gemm.hpp
/// @brief int8 weight storage for panel_gemm: symmetric int8 weights with one f32 scale per output channel,
/// activations quantised per row to int8 (stored offset by 128 as u8), products summed exactly in int32 by
/// AVX512-VNNI `vpdpbusd` (four k elements per lane and step), by AVX2 `vpmaddubsw` + `vpmaddwd`, or by a
/// scalar loop elsewhere.
///
/// Panel layout (steps = ceil(k / 4), width, 4). vpdpbusd multiplies unsigned by signed bytes, so x is stored
/// as u = q + 128 and the epilogue subtracts 128 · Σ_k w_q of the column (precomputed at packing):
/// y = s_x · s_w · (Σ u · w_q − 128 · Σ w_q). Quarter of the f32 weight bytes.
///
/// AVX2 has no u8 × s8 dot product that sums exactly: vpmaddubsw adds two u8 · s8 products in saturating
/// int16, and 2 · 255 · 127 overflows. So the AVX2 path goes back to the signed q = u − 128 ∈ [−127, 127] and
/// multiplies |q| by sign(q) · w_q (at most 2 · 127 · 127 < 2^15 per pair: exact), then vpmaddwd sums the
/// pairs into int32: Σ q · w_q directly, the same integer as the other paths after their −128 · Σ w_q.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "panel_gemm.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

/// Storage kernel for int8 weights with per-channel scales (T = float).
template <class T, class Arch>
struct Int8Panels {
  static_assert(std::is_same_v<T, float>, "moe::kernels::Int8Weights: the bank's scalar type must be float");
  using Weight = std::int8_t;
  using Input = std::uint8_t;  ///< quantised activation + 128
  using Out = float;
  static constexpr Index width = detail::panel_width<float, Arch>();
  /// AVX2: 4 rows (8 accumulators + 2 weight registers + the temporaries fit the 16 registers).
  static constexpr int rows = detail::is_avx2<Arch> ? 4 : detail::panel_rows<float, Arch>();
  static constexpr Index group = 4;
  static constexpr bool quantized = true;
  static constexpr bool row_scaled = true;
  static constexpr bool blocked = false;

  /// Scale of one output channel (a weight row of length k): max |w| / 127 (0 for an all-zero row).
  template <class S>
  static float column_scale(const S* row, Index k) {
    float m = 0.0f;
    for (Index i = 0; i < k; ++i) m = std::max(m, std::abs(static_cast<float>(row[i])));
    return m / 127.0f;
  }
  template <class S>
  static Weight encode(S v, float scale) {
    if (scale == 0.0f) return 0;
    return static_cast<Weight>(std::clamp(std::nearbyint(static_cast<float>(v) / scale), -127.0f, 127.0f));
  }
  /// Quantises in (n) to out (n_pad) = round(in / s) + 128, padding 128 (zero); returns s = max |in| / 127.
  /// Vectorised (it runs once per token and once per hidden row); the same bits as encode() per element.
  static float encode_row(const float* in, Index n, Index n_pad, Input* out) {
    float m = 0.0f;
    Index i = 0;
    if constexpr (has_simd<float, Arch>) {
      using B = xsimd::batch<float, Arch>;
      constexpr Index L = static_cast<Index>(B::size);
      B acc(0.0f);
      for (const Index n_vec = n - n % L; i < n_vec; i += L) acc = xsimd::max(acc, xsimd::abs(B::load_unaligned(in + i)));
      alignas(64) float lanes[L];
      acc.store_aligned(lanes);
      for (const float v : lanes) m = std::max(m, v);
    }
    for (; i < n; ++i) m = std::max(m, std::abs(in[i]));
    const float s = m / 127.0f;
    if (s == 0.0f) {
      std::fill_n(out, n_pad, Input(128));
      return s;
    }
    i = 0;
    if constexpr (has_simd<float, Arch>) {
      using B = xsimd::batch<float, Arch>;
      constexpr Index L = static_cast<Index>(B::size);
      const B sv(s), lo(-127.0f), hi(127.0f), offset(128.0f);
      for (const Index n_vec = n - n % L; i < n_vec; i += L) {
        const B q = xsimd::min(xsimd::max(xsimd::nearbyint(B::load_unaligned(in + i) / sv), lo), hi) + offset;
        const auto u = xsimd::batch_cast<std::int32_t>(q);  // in [1, 255]
#if defined(__AVX512F__)
        if constexpr (detail::is_avx512<Arch>) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(u));
          continue;
        }
#endif
        alignas(64) std::int32_t lanes[L];
        u.store_aligned(lanes);
        for (Index j = 0; j < L; ++j) out[i + j] = static_cast<Input>(lanes[j]);
      }
    }
    for (; i < n; ++i) out[i] = static_cast<Input>(encode(in[i], s) + 128);
    std::fill(out + n, out + n_pad, Input(128));
    return s;
  }

  /// tile (R, width) = dequantised rows xr[0..R) (scales x_scales[0..R)) times one panel over `steps` quads.
  template <int R>
  static void run(const Input* const* xr, const float* x_scales, const Weight* panel, Index steps,
                  const float* col_scales, const std::int32_t* col_sums, Out* tile) {
    alignas(64) std::int32_t acc[R][width];  // (R, width)
    // acc holds Σ u · w_q (then the epilogue subtracts 128 · Σ w_q), or on AVX2 Σ q · w_q already.
    bool signed_sums = false;
#if defined(__AVX2__)
    if constexpr (detail::is_avx2<Arch>) {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
      __m256i v[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) v[r][0] = v[r][1] = _mm256_setzero_si256();
      for (Index q = 0; q < steps; ++q) {
        const Weight* b = panel + q * width * 4;
        detail::prefetch_step<width * 4 * sizeof(Weight)>(b);
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
        for (int r = 0; r < R; ++r) {
          std::uint32_t quad;
          std::memcpy(&quad, xr[r] + 4 * q, sizeof quad);
          const __m256i a = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(quad)), flip);  // q = u - 128
          const __m256i a_abs = _mm256_abs_epi8(a);
          v[r][0] = _mm256_add_epi32(v[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(b0, a)), ones));
          v[r][1] = _mm256_add_epi32(v[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(b1, a)), ones));
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r]), v[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r] + 8), v[r][1]);
      }
      signed_sums = true;
    } else
#endif
#if defined(__AVX512VNNI__)
    if constexpr (detail::is_avx512<Arch>) {
      __m512i v[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) v[r][0] = v[r][1] = _mm512_setzero_si512();
      for (Index q = 0; q < steps; ++q) {
        const Weight* b = panel + q * width * 4;
        detail::prefetch_step<width * 4 * sizeof(Weight)>(b);
        const __m512i b0 = _mm512_load_si512(b), b1 = _mm512_load_si512(b + 64);
        for (int r = 0; r < R; ++r) {
          std::uint32_t quad;
          std::memcpy(&quad, xr[r] + 4 * q, sizeof quad);
          const __m512i a = _mm512_set1_epi32(static_cast<int>(quad));
          v[r][0] = _mm512_dpbusd_epi32(v[r][0], a, b0);
          v[r][1] = _mm512_dpbusd_epi32(v[r][1], a, b1);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_store_si512(acc[r], v[r][0]);
        _mm512_store_si512(acc[r] + 16, v[r][1]);
      }
    } else
#endif
    {
      for (int r = 0; r < R; ++r) std::fill_n(acc[r], width, 0);
      for (Index q = 0; q < steps; ++q) {
        const Weight* b = panel + q * width * 4;
        for (int r = 0; r < R; ++r) {
          const Input* a = xr[r] + 4 * q;
          for (Index c = 0; c < width; ++c) {
            acc[r][c] += a[0] * b[4 * c] + a[1] * b[4 * c + 1] + a[2] * b[4 * c + 2] + a[3] * b[4 * c + 3];
          }
        }
      }
    }
    // The integer sums are exact; one conversion and two products per element.
    for (int r = 0; r < R; ++r) {
      for (Index c = 0; c < width; ++c) {
        const std::int32_t sum = signed_sums ? acc[r][c] : acc[r][c] - 128 * col_sums[c];
        tile[r * width + c] = static_cast<float>(sum) * (x_scales[r] * col_scales[c]);
      }
    }
  }
};

/// Weight storage policy: int8 weights with per-channel scales, int8 activations with per-row scales.
struct Int8Weights {
  static constexpr const char* name() { return "int8"; }
  template <class T, class Arch>
  using kernel = Int8Panels<T, Arch>;
};

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
