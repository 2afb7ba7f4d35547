#pragma once
/// @file detail/linalg.hpp
/// @brief Accumulating products for the backward passes, on Eigen's GEMM.
///
/// Determinism: the rows of C are cut into fixed chunks of k_rows, each computed by one thread with one
/// serial Eigen product. Eigen does not parallelise a product inside a parallel region, and its blocking
/// then depends on the chunk's shape only, never on the thread count, so the bits do not either.

#include <algorithm>
#include <type_traits>

#include <Eigen/Core>

#include "../config.hpp"
#include "parallel.hpp"

namespace moe::detail {

template <class T>
using ConstEigenMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using EigenMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

template <class T>
ConstEigenMap<T> eigen(ConstMatrixView<T> v) {
  return ConstEigenMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}
template <class T>
EigenMap<T> eigen(MatrixView<T> v) {
  return EigenMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}

inline constexpr Index k_rows = 64;  // rows of C per work item

/// Runs f(first_row, n_rows) over C's rows in chunks of k_rows, in parallel when `work` is worth it.
template <class F>
void for_row_chunks(Index rows, double work, F&& f) {
  const Index chunks = (rows + k_rows - 1) / k_rows;
  MOE_OMP(omp parallel for schedule(static) if(work >= k_parallel_min_work))
  for (Index i = 0; i < chunks; ++i) f(i * k_rows, std::min(k_rows, rows - i * k_rows));
}

/// C += A B with A (m, k), B (k, n), C (m, n).
template <class T>
void add_matmul_nn(ConstMatrixView<T> a, std::type_identity_t<ConstMatrixView<T>> b,
                   std::type_identity_t<MatrixView<T>> c) {
  for_row_chunks(c.rows(), double(c.rows()) * double(c.cols()) * double(a.cols()), [&](Index r0, Index n) {
    eigen(c.middle_rows(r0, n)).noalias() += eigen(a.middle_rows(r0, n)) * eigen(b);
  });
}

/// C += A^T B with A (k, m), B (k, n), C (m, n): the weight gradient, summed over the k token rows.
template <class T>
void add_matmul_tn(ConstMatrixView<T> a, std::type_identity_t<ConstMatrixView<T>> b,
                   std::type_identity_t<MatrixView<T>> c) {
  for_row_chunks(c.rows(), double(c.rows()) * double(c.cols()) * double(a.rows()), [&](Index r0, Index n) {
    eigen(c.middle_rows(r0, n)).noalias() += eigen(a).middleCols(r0, n).transpose() * eigen(b);
  });
}

}  // namespace moe::detail
