#pragma once
/// @file routers/linear_gate.hpp
/// @brief The linear gate every router scores with: logits = x W_gᵀ, W_g in named row blocks.

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/linalg.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../parameter.hpp"
#include "../random.hpp"

namespace moe::routers {
namespace detail {

/// A linear gate without bias: logits = x Wᵀ, W made of named row blocks stacked in order (e.g. AdaMoE's
/// "gate" (n, d) and "null_gate" (m, d), which together give the n + m logits).
/// @tparam T scalar; @tparam Arch kernel instruction set
template <class T, class Arch>
class LinearGate {
 public:
  /// @param d_model input width; @param blocks (name, rows) of each block, in output order
  LinearGate(Index d_model, std::initializer_list<std::pair<const char*, Index>> blocks) : d_model_(d_model) {
    for (const auto& [name, rows] : blocks) {
      if (rows == 0) continue;
      names_.emplace_back(name);
      weights_.emplace_back(rows, d_model);
      n_outputs_ += rows;
    }
  }

  Index d_model() const { return d_model_; }      ///< input width
  Index n_outputs() const { return n_outputs_; }  ///< logits per token
  /// Block i's weight (rows_i, d_model).
  Parameter<T>& block(std::size_t i) { return weights_[i]; }
  const Parameter<T>& block(std::size_t i) const { return weights_[i]; }

  /// Every block from U(-1/sqrt(d_model), 1/sqrt(d_model)), in block order.
  void init(Rng& rng) {
    for (auto& w : weights_) w.init_uniform(rng, d_model_);
  }
  /// f(name, Parameter&) for each block.
  template <class F>
  void visit(F&& f) {
    for (std::size_t i = 0; i < weights_.size(); ++i) f(std::string_view(names_[i]), weights_[i]);
  }

  /// logits (rows, n_outputs) = x (rows, d_model) Wᵀ.
  void logits(ConstMatrixView<T> x, MatrixView<T> out) const {
    Index col = 0;
    for (const auto& w : weights_) {
      kernels::matmul_nt(Arch{}, x, w.value(), MatrixView<T>(out.data() + col, out.rows(), w.rows(), out.stride()));
      col += w.rows();
    }
  }

  /// From dlogits (n_tokens, n_outputs): dW += dlogitsᵀ x and dx += dlogits W.
  void backward(ConstMatrixView<T> x, ConstMatrixView<T> dlogits, MatrixView<T> dx) {
    Index col = 0;
    for (auto& w : weights_) {
      const ConstMatrixView<T> dz(dlogits.data() + col, dlogits.rows(), w.rows(), dlogits.stride());
      moe::detail::add_matmul_tn(dz, x, w.grad());                    // (rows, d_model)
      // Read through const: a non-const value() advances version(), which would mark every other training
      // forward still in flight as stale (MoELayer::backward checks it).
      moe::detail::add_matmul_nn(dz, std::as_const(w).value(), dx);  // (n_tokens, d_model)
      col += w.rows();
    }
  }

 private:
  Index d_model_;
  Index n_outputs_ = 0;
  std::vector<std::string> names_;
  std::vector<Parameter<T>> weights_;  // block i: (rows_i, d_model)
};

}  // namespace detail
}  // namespace moe::routers
