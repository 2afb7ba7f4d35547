#pragma once
/// @file kernels/simd/scatter_add.hpp
/// @brief axpy and the weighted scatter-add of the MoE combine step, with xsimd.

#include <cassert>
#include <cmath>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

namespace moe::kernels {

namespace detail {

/// a * b + c rounded once where the hardware has FMA (std::fma then compiles to one instruction), and
/// with two roundings where it has not (then the compiler cannot contract it either). This matches the
/// batch overload below, so every element gets the same bits from the vector body, the scalar tail or
/// the scalar Arch; a plain `y += a * x` would leave contraction to the optimiser, which does not
/// always contract.
template <class T>
  requires std::is_floating_point_v<T>
T scatter_add_fma(T a, T b, T c) {
#if defined(FP_FAST_FMA) && defined(FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// a * b + c on batches, fused where the ISA has FMA. xsimd 8.1's fma() is fused for fma3<...> but a
/// separate multiply and add for the AVX-512 archs, fused only if the optimiser contracts it.
template <class T, class A>
xsimd::batch<T, A> scatter_add_fma(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b,
                                   const xsimd::batch<T, A>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_fmadd_ps(a, b, c);
    } else {
      return _mm512_fmadd_pd(a, b, c);
    }
  }
#endif
  return xsimd::fma(a, b, c);
}

}  // namespace detail

/// y[i] += a * x[i], fused where the hardware has FMA, so that the vector body and the scalar tail
/// round alike.
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param a scale
/// @param x n inputs
/// @param y n accumulators
/// @param n length
template <class Arch, class T>
void axpy(Arch, T a, const T* x, T* y, Index n) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::axpy: T must be float or double");
  assert(n >= 0);
  Index i = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index lanes = static_cast<Index>(B::size);
    const Index n_vec = n - n % lanes;
    const B va(a);
    for (; i < n_vec; i += lanes) {
      detail::scatter_add_fma(va, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    }
  }
  for (; i < n; ++i) y[i] = detail::scatter_add_fma(a, x[i], y[i]);
}

/// The MoE combine: out.row(t) += sum_s weight[t*k + s] * src.row(src_row[t*k + s]) for every row t of
/// `out`, added in slot order s = 0..k-1; slots with src_row < 0 are dropped.
///
/// Each element of `out` receives exactly the operations of k sequential axpy calls in slot order, so
/// the result is bitwise deterministic: independent of threads and of how the rows are split, and, for
/// xsimd::default_arch, the same bits as moe::kernels::scalar (both fuse exactly when the compiler has
/// FMA). The loop runs over column blocks outside and slots inside, so each block of `out` is loaded
/// and stored once. No heap.
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param out (n_tokens, d_model); must not overlap src
/// @param src (n_rows, d_model): expert outputs
/// @param src_row (n_tokens, k) row of src for each (token, slot), or negative for a dropped slot
/// @param weight (n_tokens, k) combine weight for each (token, slot)
/// @param k slots per token
template <class Arch, class T>
void scatter_add(Arch, MatrixView<T> out, ConstMatrixView<T> src, const Index* src_row, const T* weight,
                 Index k) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::scatter_add: T must be float or double");
  assert(out.cols() == src.cols());
  assert(k >= 0);
  const Index d = out.cols();
  for (Index t = 0; t < out.rows(); ++t) {
    const Index* rows = src_row + t * k;  // (k)
    const T* w = weight + t * k;          // (k)
    T* y = out.row(t);                    // (d_model)
    Index j = 0;
    if constexpr (has_simd<T, Arch>) {
      using B = xsimd::batch<T, Arch>;
      constexpr Index lanes = static_cast<Index>(B::size);
      const Index n_vec = d - d % lanes;
      for (; j < n_vec; j += lanes) {
        B acc = B::load_unaligned(y + j);
        for (Index s = 0; s < k; ++s) {
          if (rows[s] < 0) continue;
          assert(rows[s] < src.rows());
          acc = detail::scatter_add_fma(B(w[s]), B::load_unaligned(src.row(rows[s]) + j), acc);
        }
        acc.store_unaligned(y + j);
      }
    }
    for (; j < d; ++j) {
      T acc = y[j];
      for (Index s = 0; s < k; ++s) {
        if (rows[s] < 0) continue;
        assert(rows[s] < src.rows());
        acc = detail::scatter_add_fma(w[s], src.row(rows[s])[j], acc);
      }
      y[j] = acc;
    }
  }
}

}  // namespace moe::kernels
