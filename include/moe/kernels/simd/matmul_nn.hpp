#pragma once
/// @file kernels/simd/matmul_nn.hpp
/// @brief c += a b and c += aᵀ b with b row-major and unpacked: the products of the FFN backward, input
/// gradients (dh = dy W2, dx = dg W1 + du W3, reading the nn.Linear weights the other way round from the
/// forward) and weight gradients (dW2 += dyᵀ h, dW1 += dgᵀ x, dW3 += duᵀ x).
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
#include "../../detail/parallel.hpp"
#include "../arch.hpp"
#include "panel_gemm.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// c rows cr[0..R) columns [0, width) += A (R, k) times b (k, width) with row stride ldb, where A(r, p) is
/// a[r * a_row + p * a_step]: a's rows (a_row = lda, a_step = 1) or a's columns (a_row = 1, a_step = lda).
template <int R, class Arch, class T>
void matmul_nn_tile(const T* a, Index a_row, Index a_step, const T* b, Index ldb, Index k, T* const* cr) {
  using B = xsimd::batch<T, Arch>;
  constexpr Index L = static_cast<Index>(B::size);
  B acc[R][2];  // (R, 2 registers)
  for (int r = 0; r < R; ++r) {
    acc[r][0] = B::load_unaligned(cr[r]);
    acc[r][1] = B::load_unaligned(cr[r] + L);
  }
  for (Index p = 0; p < k; ++p) {
    const T* bp = b + p * ldb;
    const T* ap = a + p * a_step;
    const B b0 = B::load_unaligned(bp), b1 = B::load_unaligned(bp + L);
    for (int r = 0; r < R; ++r) {
      const B av(ap[r * a_row]);
      acc[r][0] = fmadd(av, b0, acc[r][0]);
      acc[r][1] = fmadd(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0].store_unaligned(cr[r]);
    acc[r][1].store_unaligned(cr[r] + L);
  }
}

/// c (m, n) += A b with A(i, p) = a[i * a_row + p * a_step] (m, k) and b (k, n) row-major: the tiles, then
/// the column tail in scalars, one fused chain over p per element.
template <class Arch, class T>
void add_matmul_strided(const T* a, Index a_row, Index a_step, Index m, Index k, ConstMatrixView<T> b,
                        MatrixView<T> c) {
  const Index n = b.cols();
  if (k == 0) return;  // nothing to add (and b may have no storage)
  Index j0 = 0;
  if constexpr (has_simd<T, Arch>) {
    constexpr Index width = panel_width<T, Arch>();
    constexpr int rows = panel_rows<T, Arch>();
    T* cr[rows];  // (rows) the row block's rows of c
    for (; j0 + width <= n; j0 += width) {
      for (Index i0 = 0; i0 < m; i0 += rows) {
        const int nr = static_cast<int>(std::min<Index>(rows, m - i0));
        for (int r = 0; r < nr; ++r) cr[r] = c.row(i0 + r) + j0;
        dispatch_rows<rows>(nr, [&](auto r) {
          matmul_nn_tile<decltype(r)::value, Arch>(a + i0 * a_row, a_row, a_step, b.data() + j0, b.stride(), k, cr);
        });
      }
    }
  }
  // Columns past the last whole tile (all of them for the scalar Arch).
  for (Index i = 0; i < m; ++i) {
    T* ci = c.row(i);
    for (Index j = j0; j < n; ++j) {
      T acc = ci[j];
      for (Index p = 0; p < k; ++p) acc = fmadd(a[i * a_row + p * a_step], b(p, j), acc);
      ci[j] = acc;
    }
  }
}

/// Rows of c per work item of the parallel products.
inline constexpr Index k_parallel_rows = 64;

/// Runs f(first_row, n_rows) over `rows` in chunks of k_parallel_rows, in parallel when `work`
/// (multiply-adds) is worth a team.
template <class F>
void for_row_chunks(Index rows, double work, F&& f) {
  const Index chunks = rows / k_parallel_rows + (rows % k_parallel_rows != 0 ? 1 : 0);
  MOE_OMP(omp parallel for schedule(static) if(work >= moe::detail::k_parallel_min_work))
  for (Index i = 0; i < chunks; ++i) f(i * k_parallel_rows, std::min(k_parallel_rows, rows - i * k_parallel_rows));
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
  detail::add_matmul_strided<Arch>(a.data(), a.stride(), Index{1}, a.rows(), a.cols(), b, c);
}

/// c += aᵀ * b, accumulating into c: the weight gradient dW += dyᵀ x, summed over the k token rows.
/// @param a (k, m)
/// @param b (k, n), row-major with any row stride
/// @param c (m, n); must not overlap a or b. Only its (m, n) elements are touched. No heap.
template <class Arch, class T>
void add_matmul_tn(Arch, ConstMatrixView<T> a, ConstMatrixView<T> b, MatrixView<T> c) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::add_matmul_tn: T must be float or double");
  assert(a.rows() == b.rows() && c.rows() == a.cols() && c.cols() == b.cols());
  detail::add_matmul_strided<Arch>(a.data(), Index{1}, a.stride(), a.cols(), a.rows(), b, c);
}

/// add_matmul_nn with c's rows cut into fixed chunks of k_parallel_rows, run in parallel when the work is
/// worth it: for one product per layer (router, LoRA, GRU and shared-gate gradients), not for calls inside an
/// already parallel per-expert loop. The bits are add_matmul_nn's (one chain per element, whatever the chunk).
/// T is given explicitly (`parallel_add_matmul_nn<T>(Arch{}, a, b, c)`), so views and matrices convert.
template <class T, class Arch>
void parallel_add_matmul_nn(Arch arch, std::type_identity_t<ConstMatrixView<T>> a,
                            std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<MatrixView<T>> c) {
  detail::for_row_chunks(c.rows(), double(c.rows()) * double(c.cols()) * double(a.cols()), [&](Index r0, Index n) {
    add_matmul_nn(arch, a.middle_rows(r0, n), b, c.middle_rows(r0, n));
  });
}

/// add_matmul_tn (c += aᵀ b, a (k, m)) in parallel over fixed chunks of c's rows, as parallel_add_matmul_nn.
template <class T, class Arch>
void parallel_add_matmul_tn(Arch arch, std::type_identity_t<ConstMatrixView<T>> a,
                            std::type_identity_t<ConstMatrixView<T>> b, std::type_identity_t<MatrixView<T>> c) {
  detail::for_row_chunks(c.rows(), double(c.rows()) * double(c.cols()) * double(a.rows()), [&](Index r0, Index n) {
    add_matmul_tn(arch, ConstMatrixView<T>(a.data() + r0, a.rows(), n, a.stride()), b, c.middle_rows(r0, n));
  });
}

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
