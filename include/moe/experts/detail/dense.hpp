#pragma once
/// @file experts/detail/dense.hpp
/// @brief The building blocks every expert bank shares: nn.Linear forward with an optional bias, its
/// backward, the (gated) activation forward on rows, and its element-wise backward.
///
/// Helpers run the SIMD kernels and allocate nothing (linear_backward: kernels::add_matmul_nn/tn, one fused
/// chain per element). They live in moe::detail, so that `detail::` means one namespace inside moe::experts. All of
/// them are serial: banks call them inside their own per-expert work items, which is what makes every element computed
/// by one thread in a fixed order.

#include <algorithm>

#include "../../config.hpp"
#include "../../kernels/simd/activation.hpp"
#include "../../kernels/simd/matmul.hpp"
#include "../../kernels/simd/matmul_nn.hpp"
#include "../../kernels/simd/scatter_add.hpp"

namespace moe::detail {

/// y = x w^T (+ bias on every row): nn.Linear with w (out_features, in_features).
/// @param x    (n, in)
/// @param w    (out, in)
/// @param bias out values, or nullptr for none
/// @param y    (n, out), overwritten
template <class Arch, class T>
void linear(ConstMatrixView<T> x, ConstMatrixView<T> w, const T* bias, MatrixView<T> y) {
  kernels::matmul_nt(Arch{}, x, w, y);
  if (bias != nullptr)
    for (Index i = 0; i < y.rows(); ++i) kernels::axpy(Arch{}, T(1), bias, y.row(i), y.cols());
}

/// y += a (element-wise, same shape).
template <class Arch, class T>
void add_rows(ConstMatrixView<T> a, MatrixView<T> y) {
  for (Index i = 0; i < y.rows(); ++i) kernels::axpy(Arch{}, T(1), a.row(i), y.row(i), y.cols());
}

/// db[j] += sum over rows i (in row order) of d(i, j): the bias gradient.
template <class T>
void add_column_sums(ConstMatrixView<T> d, T* db) {
  for (Index i = 0; i < d.rows(); ++i)
    for (Index j = 0; j < d.cols(); ++j) db[j] += d(i, j);
}

/// Backward of y = x w^T + b: dw += dy^T x, db += column sums of dy, dx += dy w. A default-constructed
/// (empty) dw or dx, or a null db, skips that term (frozen weights, no bias, input gradient not needed).
/// @param dy (n, out)
/// @param x  (n, in)
/// @param w  (out, in)
/// @param dw (out, in) or empty
/// @param db out values or nullptr
/// @param dx (n, in) or empty
template <class Arch, class T>
void linear_backward(ConstMatrixView<T> dy, ConstMatrixView<T> x, ConstMatrixView<T> w, MatrixView<T> dw, T* db,
                     MatrixView<T> dx) {
  if (dw.data() != nullptr) kernels::add_matmul_tn(Arch{}, dy, x, dw);
  if (db != nullptr) add_column_sums<T>(dy, db);
  if (dx.data() != nullptr) kernels::add_matmul_nn(Arch{}, dy, w, dx);
}

/// h = act(g) * u (Gated) or act(g), row by row; h may be g itself.
/// @param g (n, m) pre-activations
/// @param u (n, m) linear values (Gated only; ignored otherwise)
/// @param h (n, m) output
template <class Act, bool Gated, class Arch, class T>
void activate_rows(ConstMatrixView<T> g, ConstMatrixView<T> u, MatrixView<T> h) {
  for (Index i = 0; i < h.rows(); ++i) {
    if constexpr (Gated) {
      kernels::gated_activate<Act>(Arch{}, g.row(i), u.row(i), h.row(i), h.cols());
    } else {
      kernels::activate<Act>(Arch{}, g.row(i), h.row(i), h.cols());
    }
  }
}

/// Backward of h = act(g) * u (Gated) or act(g), in place: reads dh, g and u; overwrites g with dL/dg and
/// (Gated) u with dL/du.
/// @param dh (n, m)
/// @param g  (n, m) pre-activations in, dL/dg out
/// @param u  (n, m) linear values in, dL/du out (Gated only)
template <class Act, bool Gated, class T>
void activation_backward(ConstMatrixView<T> dh, MatrixView<T> g, MatrixView<T> u) {
  for (Index i = 0; i < dh.rows(); ++i) {
    for (Index j = 0; j < dh.cols(); ++j) {
      const T a = g(i, j);
      if constexpr (Gated) {
        const T du = dh(i, j) * Act::apply(a);
        g(i, j) = dh(i, j) * u(i, j) * Act::derivative(a);
        u(i, j) = du;
      } else {
        g(i, j) = dh(i, j) * Act::derivative(a);
      }
    }
  }
}

/// Sets every element of v to zero (row gaps untouched).
template <class T>
void set_zero(MatrixView<T> v) {
  for (Index i = 0; i < v.rows(); ++i) std::fill_n(v.row(i), v.cols(), T(0));
}

}  // namespace moe::detail
