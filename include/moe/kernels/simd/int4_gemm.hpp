#pragma once
/// @file kernels/simd/int4_gemm.hpp
/// @brief 4-bit weight storage for panel_gemm: group-wise symmetric 4-bit weights (one f16 or f32 scale per
/// output channel and group of 32 or 64 k elements, the scale choice of ggml's q4_0), activations quantised
/// per row to int8 as for Int8Weights (stored + 128 as u8). Products are summed exactly in integers by
/// AVX512-VNNI `vpdpbusd`, by AVX2 `vpmaddubsw` (+ `vpmaddwd` once per 32 k), or by a scalar loop elsewhere;
/// each block of 32 k elements is then converted and scaled into f32 by one FMA.
///
/// Quantisation of group g of column c: m = its element of largest magnitude (the first on ties), d = m / −8
/// (f32), w_q = clamp(round(w / d), −8, 7) (ties to even), then d is stored as f16 (round to nearest even,
/// saturating at ±65504) or f32: the image is w_q · d_stored. 0.5625 bytes per weight with f16 scales and
/// group 32 (q4_0's size), 0.53 with group 64.
///
/// Panel layout, bytes, per step (one group of G k elements) for `width` columns:
///  - G / 4 quads of 2 · width bytes: byte b of quad t holds w_q + 8 of column b / 4 in its low nibble and of
///    column width / 2 + b / 4 in its high nibble, both at k = g · G + 4 t + b % 4. One load, a mask and a
///    shift give the two registers of the tile (lane = column, four k elements per lane).
///  - width scales (f16 bits or f32), column order;
/// then, after the last step, width f32 offsets C_c (below). An activation row is padded to whole groups.
///
/// The integer part multiplies u = q_x + 128 (unsigned, as vpdpbusd / vpmaddubsw need) by w_q (signed):
/// D = Σ u w_q = Σ q_x w_q + 128 S, S = Σ w_q of the block. Per block the f32 accumulator takes
/// fma(d, D, acc); the packing computed C_c by the same chain with D replaced by 128 S, so
/// y = s_x · (acc − C_c) (a zero row gives exactly 0) and no per-row group sums are needed. Every path runs
/// the same f32 operations in the same order: the ISAs agree bit for bit. AVX2's vpmaddubsw pairs stay below
/// 2 · 255 · 8 = 4080, so eight quads sum exactly in int16 (32640 < 2^15) before one vpmaddwd.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "int8_gemm.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// f32 -> f16 bits, round to nearest even; magnitudes that would round to infinity saturate at 65504.
/// NaN is not expected (scales of finite weights).
inline std::uint16_t to_f16(float v) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(v), a = u & 0x7FFFFFFFu;
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7BFFu);  // rounds to >= 65520: saturate
  if (a < 0x38800000u) {  // below 2^-14: an f16 subnormal, in units of 2^-24 (the scaling is exact)
    return static_cast<std::uint16_t>(
        sign | static_cast<std::uint16_t>(std::nearbyint(std::bit_cast<float>(a) * 16777216.0f)));
  }
  std::uint32_t h = (a - 0x38000000u) >> 13;  // rebias the exponent (127 - 15), keep 10 mantissa bits
  const std::uint32_t rest = a & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) != 0)) ++h;  // a carry rolls into the exponent correctly
  return static_cast<std::uint16_t>(sign | h);
}

/// f16 bits -> f32 (exact; no infinities or NaN are stored).
inline float from_f16(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float f = std::ldexp(static_cast<float>(m), -24);
    return sign != 0 ? -f : f;
  }
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

}  // namespace detail

/// Scale type tag of Int4Weights: f16 scales (q4_0's size).
struct F16Scales {
  using Bits = std::uint16_t;
  static Bits encode(float d) { return detail::to_f16(d); }
  static float decode(Bits b) { return detail::from_f16(b); }
};
/// Scale type tag of Int4Weights: f32 scales (no saturation or subnormal scales; 0.0625 bytes more per weight).
struct F32Scales {
  using Bits = float;
  static Bits encode(float d) { return d; }
  static float decode(Bits b) { return b; }
};

/// Storage kernel for group-wise 4-bit weights (T = float): Group k elements per scale (32 or 64).
template <class T, class Arch, Index Group, class Scales>
struct Int4Panels {
  static_assert(std::is_same_v<T, float>, "moe::kernels::Int4Weights: the bank's scalar type must be float");
  static_assert(Group == 32 || Group == 64, "moe::kernels::Int4Weights: the group must be 32 or 64 k elements");
  static_assert(std::is_same_v<Scales, F16Scales> || std::is_same_v<Scales, F32Scales>,
                "moe::kernels::Int4Weights: the scales must be F16Scales or F32Scales");
  using Weight = std::uint8_t;  ///< panel bytes (nibbles, scales, offsets)
  using Input = std::uint8_t;   ///< quantised activation + 128, as Int8Panels
  using Out = float;
  using ScaleBits = typename Scales::Bits;
  static constexpr Index width = detail::panel_width<float, Arch>();
  /// AVX2: 4 rows (8 int16 accumulators + 2 weight registers + the temporaries fit the 16 registers);
  /// AVX-512: 6 rows (12 integer and 12 f32 accumulators).
  static constexpr int rows = detail::is_avx2<Arch>     ? 4
                              : detail::is_avx512<Arch> ? 6
                                                        : detail::panel_rows<float, Arch>();
  static constexpr Index group = Group;
  static constexpr bool quantized = false;  // the scales live inside the panel (blocked layout)
  static constexpr bool row_scaled = true;
  static constexpr bool blocked = true;
  static constexpr Index block = 32;              ///< k elements summed in integers before each FMA
  static constexpr Index quad_bytes = 2 * width;  ///< four k elements of every column
  static constexpr Index step_bytes = Group / 4 * quad_bytes + width * static_cast<Index>(sizeof(ScaleBits));

  /// Bytes of a panel of `steps` groups: the steps, then width f32 offsets.
  static constexpr Index panel_bytes(Index steps) { return steps * step_bytes + width * Index{4}; }

  static float encode_row(const float* in, Index n, Index n_pad, Input* out) {
    return Int8Panels<float, Arch>::encode_row(in, n, n_pad, out);
  }

  /// The quantised group v[0..n) (n <= Group; the rest of the group is zero): w_q into q, returns d.
  template <class S>
  static float quantise_group(const S* v, Index n, std::int8_t* q) {
    float m = 0.0f;
    for (Index i = 0; i < n; ++i) {
      const auto f = static_cast<float>(v[i]);
      if (std::abs(f) > std::abs(m)) m = f;
    }
    const float d = m / -8.0f;
    for (Index i = 0; i < Group; ++i) {
      q[i] = d == 0.0f || i >= n
                 ? std::int8_t(0)
                 : static_cast<std::int8_t>(std::clamp(std::nearbyint(static_cast<float>(v[i]) / d), -8.0f, 7.0f));
    }
    return d;
  }

  /// Writes one panel (panel_bytes(steps)) from its `width` source rows of length k (nullptr: a zero column).
  template <class S>
  static void pack_panel(const S* const* src, Index k, Index steps, Weight* dst) {
    constexpr Index half = width / 2;
    float offset[width] = {};  // (width) C_c
    std::int8_t q[width][Group];
    for (Index g = 0; g < steps; ++g) {
      Weight* out = dst + g * step_bytes;
      const Index k0 = g * Group, n = std::min(Group, k - k0);
      ScaleBits bits[width];
      for (Index c = 0; c < width; ++c) {
        const float d = src[c] != nullptr ? quantise_group(src[c] + k0, n, q[c]) : 0.0f;
        if (src[c] == nullptr) std::fill_n(q[c], Group, std::int8_t(0));
        bits[c] = Scales::encode(d);
        const float ds = Scales::decode(bits[c]);
        for (Index b0 = 0; b0 < Group; b0 += block) {
          std::int32_t sum = 0;
          for (Index i = b0; i < b0 + block; ++i) sum += q[c][i];
          offset[c] = detail::fmadd(ds, static_cast<float>(128 * sum), offset[c]);
        }
      }
      for (Index t = 0; t < Group / 4; ++t) {
        for (Index b = 0; b < quad_bytes; ++b) {
          const Index c = b / 4, i = 4 * t + b % 4;
          out[t * quad_bytes + b] = static_cast<Weight>((q[c][i] + 8) | ((q[c + half][i] + 8) << 4));
        }
      }
      std::memcpy(out + Group / 4 * quad_bytes, bits, sizeof bits);
    }
    std::memcpy(dst + steps * step_bytes, offset, sizeof offset);
  }

  /// tile (R, width) = rows xr[0..R) (scales x_scales[0..R)) times one panel over `steps` groups.
  template <int R>
  static void run(const Input* const* xr, const float* x_scales, const Weight* panel, Index steps, const float*,
                  const std::int32_t*, Out* tile) {
#if defined(__AVX512VNNI__)
    if constexpr (detail::is_avx512<Arch>) {
      // The f32 accumulators stay in registers (R x 2 of them beside R x 2 integer ones: rows = 6).
      __m512 f[R][2];  // (R, 2 registers)
      for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
      for (Index g = 0; g < steps; ++g) {
        const Weight* step = panel + g * step_bytes;
        alignas(64) float d[width];  // (width) the group's scales
        decode_scales(reinterpret_cast<const ScaleBits*>(step + Group / 4 * quad_bytes), d);
        const __m512 d0 = _mm512_load_ps(d), d1 = _mm512_load_ps(d + 16);
        for (Index b0 = 0; b0 < Group; b0 += block) {
          __m512i v[R][2];
          vnni_block<R>(xr, g * Group + b0, step + b0 / 4 * quad_bytes, v);
          for (int r = 0; r < R; ++r) {
            f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v[r][0]), d0, f[r][0]);
            f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v[r][1]), d1, f[r][1]);
          }
        }
      }
      const __m512 c0 = _mm512_loadu_ps(panel + steps * step_bytes),
                   c1 = _mm512_loadu_ps(panel + steps * step_bytes + 64);
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(x_scales[r]);
        _mm512_store_ps(tile + r * width, _mm512_mul_ps(_mm512_sub_ps(f[r][0], c0), s));
        _mm512_store_ps(tile + r * width + 16, _mm512_mul_ps(_mm512_sub_ps(f[r][1], c1), s));
      }
      return;
    }
#endif
    std::fill_n(tile, R * width, 0.0f);
    for (Index g = 0; g < steps; ++g) {
      const Weight* step = panel + g * step_bytes;
      alignas(64) float d[width];  // (width) the group's scales
      decode_scales(reinterpret_cast<const ScaleBits*>(step + Group / 4 * quad_bytes), d);
      for (Index b0 = 0; b0 < Group; b0 += block) {
        alignas(64) std::int32_t acc[R][width];  // (R, width) D of this block
        block_sums<R>(xr, g * Group + b0, step + b0 / 4 * quad_bytes, acc);
        accumulate<R>(acc, d, tile);
      }
    }
    float offset[width];
    std::memcpy(offset, panel + steps * step_bytes, sizeof offset);
    for (int r = 0; r < R; ++r) {
      for (Index c = 0; c < width; ++c) tile[r * width + c] = (tile[r * width + c] - offset[c]) * x_scales[r];
    }
  }

 private:
  static void decode_scales(const ScaleBits* bits, float* d) {
#if defined(__AVX512F__)
    if constexpr (detail::is_avx512<Arch> && std::is_same_v<Scales, F16Scales>) {
      _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits))));
      _mm512_store_ps(d + 16, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 16))));
      return;
    }
#endif
#if defined(__F16C__)
    if constexpr (detail::is_avx2<Arch> && std::is_same_v<Scales, F16Scales>) {
      _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits))));
      _mm256_store_ps(d + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + 8))));
      return;
    }
#endif
    for (Index c = 0; c < width; ++c) d[c] = Scales::decode(bits[c]);
  }

#if defined(__AVX512VNNI__)
  // v (R, 2 registers) = Σ u · w_q over the block of 32 k elements at k0, whose 8 quads start at `quads`.
  template <int R>
  static void vnni_block(const Input* const* xr, Index k0, const Weight* quads, __m512i (*v)[2]) {
    const __m512i mask = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    for (int r = 0; r < R; ++r) v[r][0] = v[r][1] = _mm512_setzero_si512();
    for (Index t = 0; t < block / 4; ++t) {
      detail::prefetch_step<2 * quad_bytes>(quads + t * quad_bytes);
      const __m512i p = _mm512_loadu_si512(quads + t * quad_bytes);
      const __m512i b0 = _mm512_sub_epi8(_mm512_and_si512(p, mask), eight);
      const __m512i b1 = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p, 4), mask), eight);
      for (int r = 0; r < R; ++r) {
        std::uint32_t quad;
        std::memcpy(&quad, xr[r] + k0 + 4 * t, sizeof quad);
        const __m512i a = _mm512_set1_epi32(static_cast<int>(quad));
        v[r][0] = _mm512_dpbusd_epi32(v[r][0], a, b0);
        v[r][1] = _mm512_dpbusd_epi32(v[r][1], a, b1);
      }
    }
  }
#endif

  // acc (R, width) = Σ u · w_q over the block of 32 k elements at k0, whose 8 quads start at `quads`.
  template <int R>
  static void block_sums(const Input* const* xr, Index k0, const Weight* quads, std::int32_t (*acc)[width]) {
#if defined(__AVX2__)
    if constexpr (detail::is_avx2<Arch>) {
      const __m256i mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
      __m256i v[R][2];  // (R, 2 registers) int16 sums, exact over the 8 quads
      for (int r = 0; r < R; ++r) v[r][0] = v[r][1] = _mm256_setzero_si256();
      for (Index t = 0; t < block / 4; ++t) {
        detail::prefetch_step<2 * quad_bytes>(quads + t * quad_bytes);
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quads + t * quad_bytes));
        const __m256i b0 = _mm256_sub_epi8(_mm256_and_si256(p, mask), eight);
        const __m256i b1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(p, 4), mask), eight);
        for (int r = 0; r < R; ++r) {
          std::uint32_t quad;
          std::memcpy(&quad, xr[r] + k0 + 4 * t, sizeof quad);
          const __m256i a = _mm256_set1_epi32(static_cast<int>(quad));
          v[r][0] = _mm256_add_epi16(v[r][0], _mm256_maddubs_epi16(a, b0));
          v[r][1] = _mm256_add_epi16(v[r][1], _mm256_maddubs_epi16(a, b1));
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r]), _mm256_madd_epi16(v[r][0], ones));
        _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r] + 8), _mm256_madd_epi16(v[r][1], ones));
      }
      return;
    }
#endif
    constexpr Index half = width / 2;
    for (int r = 0; r < R; ++r) std::fill_n(acc[r], width, 0);
    for (Index t = 0; t < block / 4; ++t) {
      const Weight* p = quads + t * quad_bytes;
      for (int r = 0; r < R; ++r) {
        const Input* a = xr[r] + k0 + 4 * t;
        for (Index b = 0; b < quad_bytes; ++b) {
          const int lo = (p[b] & 0x0F) - 8, hi = (p[b] >> 4) - 8;
          acc[r][b / 4] += a[b % 4] * lo;
          acc[r][half + b / 4] += a[b % 4] * hi;
        }
      }
    }
  }

  // tile (R, width) += d · acc, one FMA per element (the same rounding on every path).
  template <int R>
  static void accumulate(const std::int32_t (*acc)[width], const float* d, float* tile) {
    if constexpr (has_simd<float, Arch>) {
      using B = xsimd::batch<float, Arch>;
      using I = xsimd::batch<std::int32_t, Arch>;
      constexpr Index L = static_cast<Index>(B::size);
      for (Index c = 0; c < width; c += L) {
        const B dc = B::load_aligned(d + c);
        for (int r = 0; r < R; ++r) {
          const B sum = xsimd::batch_cast<float>(I::load_aligned(acc[r] + c));
          detail::fmadd(dc, sum, B::load_aligned(tile + r * width + c)).store_aligned(tile + r * width + c);
        }
      }
    } else {
      for (int r = 0; r < R; ++r) {
        for (Index c = 0; c < width; ++c)
          tile[r * width + c] = detail::fmadd(d[c], static_cast<float>(acc[r][c]), tile[r * width + c]);
      }
    }
  }
};

/// Weight storage policy: group-wise symmetric 4-bit weights (q4_0's scale rule) with Scales (F16Scales or
/// F32Scales) per Group (32 or 64) k elements; int8 activations with per-row scales. Inference and
/// PackedOnly banks; a trainable bank keeps f32 weights and re-packs after each update.
template <Index Group = 32, class Scales = F16Scales>
struct Int4Weights {
  static constexpr const char* name() { return "int4"; }
  template <class T, class Arch>
  using kernel = Int4Panels<T, Arch, Group, Scales>;
};

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
