#pragma once
/// @file kernels/reference/scatter_add.hpp
/// @brief Plain-loop axpy and weighted scatter-add (the MoE combine step): the test oracle for
/// kernels/simd/scatter_add.hpp.

#include <cassert>

#include "../../config.hpp"

namespace moe::kernels::reference {

/// y[i] += a * x[i].
template <class T>
void axpy(T a, const T* x, T* y, Index n) {
  for (Index i = 0; i < n; ++i) y[i] += a * x[i];
}

/// out.row(t) += sum_s weight[t*k + s] * src.row(src_row[t*k + s]), added in slot order s; slots with
/// src_row < 0 are dropped.
/// @param out (n_tokens, d_model)
/// @param src (n_rows, d_model): expert outputs
/// @param src_row (n_tokens, k) row of src for each (token, slot), or negative for a dropped slot
/// @param weight (n_tokens, k) combine weight for each (token, slot)
/// @param k slots per token
template <class T>
void scatter_add(MatrixView<T> out, ConstMatrixView<T> src, const Index* src_row, const T* weight, Index k) {
  assert(out.cols() == src.cols());
  for (Index t = 0; t < out.rows(); ++t) {
    for (Index s = 0; s < k; ++s) {
      const Index r = src_row[t * k + s];
      if (r < 0) continue;
      assert(r < src.rows());
      axpy(weight[t * k + s], src.row(r), out.row(t), out.cols());
    }
  }
}

}  // namespace moe::kernels::reference
