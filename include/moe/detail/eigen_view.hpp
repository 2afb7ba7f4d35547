#pragma once
/// @file detail/eigen_view.hpp
/// @brief Eigen maps of moe's matrix views (no copy), for code that wants Eigen's expressions on them: the
/// stack's copies and the tests' references. The library's products run on kernels/ (matmul.hpp,
/// matmul_nn.hpp, panel_gemm.hpp), never on Eigen's GEMM.

#include <Eigen/Core>

#include "../config.hpp"

namespace moe::detail {

template <class T>
using ConstEigenMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using EigenMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

/// The view as an Eigen map (read-only).
template <class T>
ConstEigenMap<T> eigen(ConstMatrixView<T> v) {
  return ConstEigenMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}
/// The view as an Eigen map (writable).
template <class T>
EigenMap<T> eigen(MatrixView<T> v) {
  return EigenMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.stride()));
}

}  // namespace moe::detail
