#pragma once
/// @file config.hpp
/// @brief Basic types: the index type, row-major matrix aliases and the non-owning row-major views
/// that the whole API takes (one token per contiguous row).

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <type_traits>

#include <Eigen/Core>

#include "error.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define MOE_RESTRICT __restrict__
#else
#define MOE_RESTRICT
#endif

namespace moe {

using Index = std::ptrdiff_t;

namespace detail {

/// The most elements of T one buffer may hold: its byte count must fit in std::ptrdiff_t (PTRDIFF_MAX bytes),
/// which pointer differences, std::vector and every Index product over the buffer rely on.
template <class T>
inline constexpr Index k_max_elements = std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T));

/// The one overflow-checked size product: `factors` (each >= 0) multiplied as the element count of one buffer
/// of T. Throws moe::Error "<owner>: <what> = a * b * ... exceeds the ... elements of T a buffer may hold"
/// when the product is above k_max_elements<T>; no product that overflows is ever formed.
/// @param owner e.g. "moe::experts::FFN"; @param what the fields, e.g. "n_experts * d_ff * d_model"
template <class T>
Index checked_size(const char* owner, const char* what, std::initializer_list<Index> factors) {
  for (const Index f : factors) require(f >= 0, owner, ": ", what, " has a negative factor ", f);
  for (const Index f : factors)
    if (f == 0) return 0;
  Index product = 1;
  for (const Index f : factors) {
    if (product <= k_max_elements<T> / f) {
      product *= f;
      continue;
    }
    std::ostringstream os;
    for (const Index g : factors) os << (os.tellp() > 0 ? " * " : "") << g;
    require(false, owner, ": ", what, " = ", os.str(), " exceeds the ", k_max_elements<T>, " elements of ",
            sizeof(T), " bytes a buffer may hold (PTRDIFF_MAX bytes)");
  }
  return product;
}

}  // namespace detail

/// Row-major dynamic matrix: the layout of every token matrix, (n_tokens, d_model).
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Non-owning view of a row-major matrix with unit inner stride and any row stride.
/// Built from a raw pointer or from any row-major Eigen object with direct access
/// (RowMatrix, Map, Block of a RowMatrix); never copies. `T` may be const.
template <class T>
class MatrixView {
 public:
  using Scalar = std::remove_const_t<T>;

  MatrixView() = default;
  /// @param data first element; @param rows, cols shape; @param stride distance between rows (>= cols)
  MatrixView(T* data, Index rows, Index cols, Index stride = -1)
      : data_(data), rows_(rows), cols_(cols), stride_(stride < 0 ? cols : stride) {
    detail::require(rows >= 0 && cols >= 0, "moe::MatrixView: negative shape (", rows, ", ", cols, ")");
    detail::require(stride_ >= cols, "moe::MatrixView: row stride ", stride_, " is smaller than cols ", cols);
    detail::require(data != nullptr || rows * cols == 0, "moe::MatrixView: null data for a non-empty view");
  }

  /// From an Eigen object: it must be row-major (or a single row) with direct access and unit inner stride.
  template <class Derived>
    requires std::is_base_of_v<Eigen::EigenBase<std::remove_cvref_t<Derived>>, std::remove_cvref_t<Derived>>
  MatrixView(Derived&& m)  // NOLINT(google-explicit-constructor): views convert implicitly, like Eigen::Ref
      : MatrixView(m.data(), static_cast<Index>(m.rows()), static_cast<Index>(m.cols()),
                   std::remove_cvref_t<Derived>::IsRowMajor && m.rows() > 1 ? static_cast<Index>(m.outerStride())
                                                                           : static_cast<Index>(m.cols())) {
    using D = std::remove_cvref_t<Derived>;
    static_assert(bool(Eigen::internal::traits<D>::Flags & Eigen::DirectAccessBit),
                  "moe::MatrixView: the Eigen expression must have direct access (a Matrix, Map or Block), "
                  "not an expression to evaluate");
    static_assert(bool(D::IsRowMajor) || D::ColsAtCompileTime == 1 || D::RowsAtCompileTime == 1,
                  "moe::MatrixView: token matrices are row-major (one token per contiguous row); "
                  "use moe::RowMatrix<T> or an Eigen::Map with Eigen::RowMajor");
    detail::require(m.innerStride() == 1 || m.size() <= 1,
                    "moe::MatrixView: the Eigen object must have unit inner stride, got ", m.innerStride());
  }

  /// A view with a shape and no data, for measuring arenas (see workspace.hpp): never dereferenced.
  static MatrixView shape_only(Index rows, Index cols) {
    MatrixView v;
    v.rows_ = rows;
    v.cols_ = cols;
    v.stride_ = cols;
    return v;
  }

  /// A const view from a mutable one.
  template <class U>
    requires(std::is_const_v<T> && std::is_same_v<U, Scalar>)
  MatrixView(const MatrixView<U>& v) : data_(v.data()), rows_(v.rows()), cols_(v.cols()), stride_(v.stride()) {}

  T* data() const { return data_; }                    ///< first element
  Index rows() const { return rows_; }                 ///< number of rows (tokens)
  Index cols() const { return cols_; }                 ///< number of columns (features)
  Index stride() const { return stride_; }             ///< elements between consecutive rows
  T* row(Index i) const { return data_ + i * stride_; }  ///< pointer to row i
  T& operator()(Index i, Index j) const { return data_[i * stride_ + j]; }

  /// Rows [first, first + count) as a view.
  MatrixView middle_rows(Index first, Index count) const {
    return MatrixView(data_ + first * stride_, count, cols_, stride_);
  }

 private:
  T* data_ = nullptr;
  Index rows_ = 0;
  Index cols_ = 0;
  Index stride_ = 0;
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

}  // namespace moe
