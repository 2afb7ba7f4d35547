#pragma once
/// @file kernels/reference/matmul.hpp
/// @brief Triple loops y = x w^T and c += a b: the test oracles for kernels/simd/matmul.hpp and
/// kernels/simd/matmul_nn.hpp (instantiate with double).

#include <cassert>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// y = x * w^T, overwriting y: nn.Linear with its weight stored (out_features, in_features) row-major.
/// Accumulates in T, in increasing p.
/// @param x (m, k)
/// @param w (n, k)
/// @param y (m, n)
template <class T>
void matmul_nt(ConstMatrixView<T> x, ConstMatrixView<T> w, MatrixView<T> y) {
  assert(x.cols() == w.cols() && y.rows() == x.rows() && y.cols() == w.rows());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < w.rows(); ++j) {
      T sum = 0;
      for (Index p = 0; p < x.cols(); ++p) sum += x(i, p) * w(j, p);
      y(i, j) = sum;
    }
  }
}

/// c += a * b. Accumulates in T onto c, in increasing p.
/// @param a (m, k)
/// @param b (k, n)
/// @param c (m, n)
template <class T>
void add_matmul_nn(ConstMatrixView<T> a, ConstMatrixView<T> b, MatrixView<T> c) {
  assert(a.cols() == b.rows() && c.rows() == a.rows() && c.cols() == b.cols());
  for (Index i = 0; i < a.rows(); ++i) {
    for (Index j = 0; j < b.cols(); ++j) {
      T sum = c(i, j);
      for (Index p = 0; p < a.cols(); ++p) sum += a(i, p) * b(p, j);
      c(i, j) = sum;
    }
  }
}

}  // namespace moe::kernels::reference
