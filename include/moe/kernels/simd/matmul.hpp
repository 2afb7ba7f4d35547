#pragma once
/// @file kernels/simd/matmul.hpp
/// @brief y = x w^T with xsimd, register-tiled 4 x 4 (rows of x by rows of w), vectorised along k.
/// A first kernel: no packing or cache blocking yet, meant for L2-resident operands.

#include <cassert>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// One (MR, NR) tile of y = x w^T: rows [i0, i0 + MR) of x against rows [j0, j0 + NR) of w.
/// MR * NR vector accumulators, reduced once at the end, then the k tail in scalars.
template <int MR, int NR, class Arch, class T>
void matmul_nt_tile(ConstMatrixView<T> x, ConstMatrixView<T> w, MatrixView<T> y, Index i0, Index j0) {
  const Index k = x.cols();
  const T* xr[MR];  // (MR) rows of x
  const T* wr[NR];  // (NR) rows of w
  for (int r = 0; r < MR; ++r) xr[r] = x.row(i0 + r);
  for (int c = 0; c < NR; ++c) wr[c] = w.row(j0 + c);
  T sum[MR][NR];  // (MR, NR)
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) sum[r][c] = T(0);
  }

  Index p = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index lanes = static_cast<Index>(B::size);
    const Index k_vec = k - k % lanes;
    if (k_vec > 0) {
      B acc[MR * NR];  // (MR, NR) vector accumulators
      for (int e = 0; e < MR * NR; ++e) acc[e] = B(T(0));
      for (; p < k_vec; p += lanes) {
        B xv[MR];  // (MR)
        for (int r = 0; r < MR; ++r) xv[r] = B::load_unaligned(xr[r] + p);
        for (int c = 0; c < NR; ++c) {
          const B wv = B::load_unaligned(wr[c] + p);
          for (int r = 0; r < MR; ++r) acc[r * NR + c] = fmadd(xv[r], wv, acc[r * NR + c]);
        }
      }
      // One hadd per accumulator. Not xsimd::haddp: in xsimd 8.1 its avx512 f32 version returns the
      // sums in the wrong lane order (lanes 2-5 and 10-13 swapped in pairs).
      for (int e = 0; e < MR * NR; ++e) sum[e / NR][e % NR] = xsimd::hadd(acc[e]);
    }
  }
  for (; p < k; ++p) {
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < NR; ++c) sum[r][c] += xr[r][p] * wr[c][p];
    }
  }

  for (int r = 0; r < MR; ++r) {
    T* yr = y.row(i0 + r) + j0;  // (NR)
    for (int c = 0; c < NR; ++c) yr[c] = sum[r][c];
  }
}

}  // namespace detail

/// y = x * w^T, overwriting y: nn.Linear with its weight stored (out_features, in_features) row-major.
///
/// 4 x 4 tiles of (rows of x, rows of w) with 16 vector accumulators along k; the edges of m and n use
/// 4 x 1, 1 x 4 and 1 x 1 tiles, and the k tail is scalar. k == 0 writes zeros; m == 0 or n == 0 writes
/// nothing. Only y's (m, n) elements are written (its row gaps are untouched). No heap.
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param x (m, k)
/// @param w (n, k)
/// @param y (m, n); must not overlap x or w
template <class Arch, class T>
void matmul_nt(Arch, ConstMatrixView<T> x, ConstMatrixView<T> w, MatrixView<T> y) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::matmul_nt: T must be float or double");
  assert(x.cols() == w.cols() && y.rows() == x.rows() && y.cols() == w.rows());
  constexpr int tile = 4;
  const Index m = x.rows(), n = w.rows();
  const Index m_tiles = m - m % tile, n_tiles = n - n % tile;
  Index i = 0;
  for (; i < m_tiles; i += tile) {
    Index j = 0;
    for (; j < n_tiles; j += tile) detail::matmul_nt_tile<tile, tile, Arch>(x, w, y, i, j);
    for (; j < n; ++j) detail::matmul_nt_tile<tile, 1, Arch>(x, w, y, i, j);
  }
  for (; i < m; ++i) {
    Index j = 0;
    for (; j < n_tiles; j += tile) detail::matmul_nt_tile<1, tile, Arch>(x, w, y, i, j);
    for (; j < n; ++j) detail::matmul_nt_tile<1, 1, Arch>(x, w, y, i, j);
  }
}

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
