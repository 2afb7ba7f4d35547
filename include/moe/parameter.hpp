#pragma once
/// @file parameter.hpp
/// @brief Parameter<T>: a trainable tensor (64-byte aligned, row-major) with its gradient, which is
/// allocated at the first backward or first request, so inference-only layers never pay for it.

#include <algorithm>
#include <cmath>
#include <vector>

#include <xsimd/memory/xsimd_aligned_allocator.hpp>

#include "config.hpp"
#include "random.hpp"

namespace moe {

/// A (rows, cols) row-major trainable tensor and its accumulated gradient.
template <class T>
class Parameter {
 public:
  Parameter(Index rows, Index cols)
      : rows_(rows), cols_(cols), value_(static_cast<std::size_t>(rows * cols), T(0)) {}

  Index rows() const { return rows_; }  ///< rows
  Index cols() const { return cols_; }  ///< columns
  T* data() { return value_.data(); }   ///< first value
  const T* data() const { return value_.data(); }
  MatrixView<T> value() { return {value_.data(), rows_, cols_}; }  ///< the values
  ConstMatrixView<T> value() const { return {value_.data(), rows_, cols_}; }

  /// The gradient, same shape; allocated (zero) on first use.
  MatrixView<T> grad() {
    if (grad_.empty()) grad_.assign(value_.size(), T(0));
    return {grad_.data(), rows_, cols_};
  }
  /// True once a gradient exists (after a backward or a grad() call).
  bool has_grad() const { return !grad_.empty(); }
  /// Sets the gradient to zero (keeps its memory).
  void zero_grad() { std::fill(grad_.begin(), grad_.end(), T(0)); }

  /// Fills the values from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the nn.Linear default.
  void init_uniform(Rng& rng, Index fan_in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    for (auto& v : value_) v = static_cast<T>(rng.uniform(-bound, bound));
  }

 private:
  using Buffer = std::vector<T, xsimd::aligned_allocator<T, 64>>;
  Index rows_;
  Index cols_;
  Buffer value_;  // (rows, cols)
  Buffer grad_;   // (rows, cols) or empty
};

}  // namespace moe
