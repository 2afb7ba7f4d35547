#pragma once
/// @file routers/linear_gate.hpp
/// @brief The linear gate every router scores with: logits = x W_gᵀ, W_g in named row blocks.

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../kernels/simd/matmul_nn.hpp"
#include "../kernels/simd/scatter_add.hpp"
#include "../parameter.hpp"
#include "../random.hpp"

namespace moe::routers {
namespace detail {

/// A linear gate: logits = x Wᵀ (+ b), W made of named row blocks stacked in order (e.g. AdaMoE's "gate" (n, d)
/// and "null_gate" (m, d), which together give the n + m logits), b an optional bias over all logits ("gate_bias",
/// (1, n_outputs): gpt-oss's router is an nn.Linear with bias).
/// @tparam T scalar; @tparam Arch kernel instruction set
template <class T, class Arch>
class LinearGate {
 public:
  /// @param d_model input width; @param blocks (name, rows) of each block, in output order; @param bias a bias b
  LinearGate(Index d_model, std::initializer_list<std::pair<const char*, Index>> blocks, bool bias = false)
      : d_model_(d_model) {
    for (const auto& [name, rows] : blocks) {
      if (rows == 0) continue;
      names_.emplace_back(name);
      weights_.emplace_back(rows, d_model);
      n_outputs_ += rows;
    }
    bias_ = Parameter<T>(bias ? 1 : 0, n_outputs_);
  }

  Index d_model() const { return d_model_; }      ///< input width
  Index n_outputs() const { return n_outputs_; }  ///< logits per token
  /// Block i's weight (rows_i, d_model).
  Parameter<T>& block(std::size_t i) { return weights_[i]; }
  const Parameter<T>& block(std::size_t i) const { return weights_[i]; }

  /// The bias b, (1, n_outputs); (0, n_outputs) without one.
  Parameter<T>& bias() { return bias_; }
  const Parameter<T>& bias() const { return bias_; }

  /// Every block, then the bias, from U(-1/sqrt(d_model), 1/sqrt(d_model)) (nn.Linear), in that order.
  void init(Rng& rng) {
    for (auto& w : weights_) w.init_uniform(rng, d_model_);
    if (bias_.rows() > 0) bias_.init_uniform(rng, d_model_);
  }
  /// f(name, Parameter&) for each block, then "gate_bias" when there is one.
  template <class F>
  void visit(F&& f) {
    for (std::size_t i = 0; i < weights_.size(); ++i) f(std::string_view(names_[i]), weights_[i]);
    if (bias_.rows() > 0) f(std::string_view("gate_bias"), bias_);
  }

  /// logits (rows, n_outputs) = x (rows, d_model) Wᵀ (+ b).
  void logits(ConstMatrixView<T> x, MatrixView<T> out) const {
    Index col = 0;
    for (const auto& w : weights_) {
      kernels::matmul_nt(Arch{}, x, w.value(), MatrixView<T>(out.data() + col, out.rows(), w.rows(), out.stride()));
      col += w.rows();
    }
    if (bias_.rows() > 0)
      for (Index t = 0; t < out.rows(); ++t) kernels::axpy(Arch{}, T(1), bias_.data(), out.row(t), n_outputs_);
  }

  /// From dlogits (n_tokens, n_outputs): dW += dlogitsᵀ x, db += Σ_t dlogits[t] and dx += dlogits W.
  void backward(ConstMatrixView<T> x, ConstMatrixView<T> dlogits, MatrixView<T> dx) {
    if (bias_.rows() > 0) {
      T* db = bias_.grad().row(0);
      for (Index t = 0; t < dlogits.rows(); ++t) kernels::axpy(Arch{}, T(1), dlogits.row(t), db, n_outputs_);
    }
    Index col = 0;
    for (auto& w : weights_) {
      const ConstMatrixView<T> dz(dlogits.data() + col, dlogits.rows(), w.rows(), dlogits.stride());
      kernels::parallel_add_matmul_tn<T>(Arch{}, dz, x, w.grad());  // (rows, d_model)
      // Read through const: a non-const value() advances version(), which would mark every other training
      // forward still in flight as stale (MoELayer::backward checks it).
      kernels::parallel_add_matmul_nn<T>(Arch{}, dz, std::as_const(w).value(), dx);  // (n_tokens, d_model)
      col += w.rows();
    }
  }

 private:
  Index d_model_;
  Index n_outputs_ = 0;
  std::vector<std::string> names_;
  std::vector<Parameter<T>> weights_;  // block i: (rows_i, d_model)
  Parameter<T> bias_{0, 0};            // (1, n_outputs) or empty
};

}  // namespace detail
}  // namespace moe::routers
