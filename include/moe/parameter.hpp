#pragma once
/// @file parameter.hpp
/// @brief Parameter<T>: a trainable tensor (64-byte aligned, row-major) with its gradient, which is
/// allocated at the first backward or first request, so inference-only layers never pay for it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <xsimd/memory/xsimd_aligned_allocator.hpp>

#include "config.hpp"
#include "random.hpp"

namespace moe {

/// A (rows, cols) row-major trainable tensor and its accumulated gradient.
template <class T>
class Parameter {
 public:
  /// Throws moe::Error when rows * cols elements of T exceed PTRDIFF_MAX bytes (see detail::checked_size).
  Parameter(Index rows, Index cols)
      : rows_(rows),
        cols_(cols),
        value_(static_cast<std::size_t>(detail::checked_size<T>("moe::Parameter", "rows * cols", {rows, cols})),
               T(0)) {}

  Index rows() const { return rows_; }  ///< rows
  Index cols() const { return cols_; }  ///< columns
  /// First value. The non-const accessors count as writes: they advance version().
  T* data() {
    ++version_;
    return value_.data();
  }
  const T* data() const { return value_.data(); }
  /// The values, (rows, cols).
  MatrixView<T> value() {
    ++version_;
    return {value_.data(), rows_, cols_};
  }
  ConstMatrixView<T> value() const { return {value_.data(), rows_, cols_}; }
  /// Advances on every non-const access to the values: what a cache derived from them (an expert bank's
  /// packed panels) compares to know it is stale. Writes through a pointer kept from an earlier access are
  /// not seen; call data() again (or the owner's repack hook) after them.
  std::uint64_t version() const { return version_; }

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
    ++version_;
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    for (auto& v : value_) v = static_cast<T>(rng.uniform(-bound, bound));
  }

 private:
  using Buffer = std::vector<T, xsimd::aligned_allocator<T, 64>>;
  Index rows_;
  Index cols_;
  Buffer value_;  // (rows, cols)
  Buffer grad_;   // (rows, cols) or empty
  std::uint64_t version_ = 0;
};

}  // namespace moe
