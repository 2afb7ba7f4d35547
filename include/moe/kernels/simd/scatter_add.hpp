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
  detail::elementwise<T, Arch>(n, [&]<class V>(V, Index i) {
    detail::store(detail::fmadd(V(a), detail::load<V>(x + i), detail::load<V>(y + i)), y + i);
  });
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
          acc = detail::fmadd(B(w[s]), B::load_unaligned(src.row(rows[s]) + j), acc);
        }
        acc.store_unaligned(y + j);
      }
    }
    for (; j < d; ++j) {
      T acc = y[j];
      for (Index s = 0; s < k; ++s) {
        if (rows[s] < 0) continue;
        assert(rows[s] < src.rows());
        acc = detail::fmadd(w[s], src.row(rows[s])[j], acc);
      }
      y[j] = acc;
    }
  }
}

}  // namespace moe::kernels
