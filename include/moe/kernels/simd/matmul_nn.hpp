#pragma once
/// @file kernels/simd/matmul_nn.hpp
/// @brief c += a b with b row-major and unpacked: the input-gradient products of the FFN backward
/// (dh = dy W2, dx = dg W1 + du W3), which read the nn.Linear weights the other way round from the forward.
///
/// The register tile is panel_gemm's (rows x two registers of columns): one broadcast of a per row and
/// step, two loads of a row of b. A column strip of b (k x tile width) is read once per row block and stays
/// in L2 across the blocks, so b needs no packed copy (which would have to be redone after every weight
/// update). Column tails narrower than the tile run in scalars.
///
/// Every element of c is its initial value plus one chain of fused multiply-adds over k in increasing
/// order, on every path: results do not depend on the tiling, the architecture or the thread count.

#include <algorithm>
#include <cassert>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"
#include "panel_gemm.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// c rows cr[0..R) columns [0, width) += a rows ar[0..R) times b (k, width) with row stride ldb.
template <int R, class Arch, class T>
void matmul_nn_tile(const T* const* ar, const T* b, Index ldb, Index k, T* const* cr) {
  using B = xsimd::batch<T, Arch>;
  constexpr Index L = static_cast<Index>(B::size);
  B acc[R][2];  // (R, 2 registers)
  for (int r = 0; r < R; ++r) {
    acc[r][0] = B::load_unaligned(cr[r]);
    acc[r][1] = B::load_unaligned(cr[r] + L);
  }
  for (Index p = 0; p < k; ++p) {
    const T* bp = b + p * ldb;
    const B b0 = B::load_unaligned(bp), b1 = B::load_unaligned(bp + L);
    for (int r = 0; r < R; ++r) {
      const B a(ar[r][p]);
      acc[r][0] = fmadd(a, b0, acc[r][0]);
      acc[r][1] = fmadd(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0].store_unaligned(cr[r]);
    acc[r][1].store_unaligned(cr[r] + L);
  }
}

}  // namespace detail

/// c += a * b, accumulating into c.
/// @tparam Arch an xsimd architecture (register tiles + scalar column tail) or moe::kernels::scalar
/// @param a (m, k)
/// @param b (k, n), row-major with any row stride
/// @param c (m, n); must not overlap a or b. Only its (m, n) elements are touched. No heap.
template <class Arch, class T>
void add_matmul_nn(Arch, ConstMatrixView<T> a, ConstMatrixView<T> b, MatrixView<T> c) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::add_matmul_nn: T must be float or double");
  assert(a.cols() == b.rows() && c.rows() == a.rows() && c.cols() == b.cols());
  const Index m = a.rows(), n = b.cols(), k = a.cols();
  if (k == 0) return;  // nothing to add (and b may have no storage)
  Index j0 = 0;
  if constexpr (has_simd<T, Arch>) {
    constexpr Index width = detail::panel_width<T, Arch>();
    constexpr int rows = detail::panel_rows<T, Arch>();
    const T* ar[rows];  // (rows) the row block's rows of a
    T* cr[rows];        // (rows) and of c
    for (; j0 + width <= n; j0 += width) {
      for (Index i0 = 0; i0 < m; i0 += rows) {
        const int nr = static_cast<int>(std::min<Index>(rows, m - i0));
        for (int r = 0; r < nr; ++r) {
          ar[r] = a.row(i0 + r);
          cr[r] = c.row(i0 + r) + j0;
        }
        detail::dispatch_rows<rows>(nr, [&](auto r) {
          detail::matmul_nn_tile<decltype(r)::value, Arch>(ar, b.data() + j0, b.stride(), k, cr);
        });
      }
    }
  }
  // Columns past the last whole tile (all of them for the scalar Arch): the same chain per element.
  for (Index i = 0; i < m; ++i) {
    const T* ai = a.row(i);
    T* ci = c.row(i);
    for (Index j = j0; j < n; ++j) {
      T acc = ci[j];
      for (Index p = 0; p < k; ++p) acc = detail::fmadd(ai[p], b(p, j), acc);
      ci[j] = acc;
    }
  }
}

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
