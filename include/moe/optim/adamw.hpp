#pragma once
/// @file optim/adamw.hpp
/// @brief AdamW (Loshchilov & Hutter) with torch.optim.AdamW's update: p *= 1 - lr wd; m = b1 m + (1-b1) g;
/// v = b2 v + (1-b2) g^2; p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).

#include <cmath>
#include <string>

#include "../config.hpp"
#include "../parameter.hpp"
#include "state.hpp"

namespace moe::optim {

/// Settings of AdamW (PyTorch defaults); validated by the constructor (moe::Error naming the field).
struct AdamWConfig {
  double lr = 1e-3;           ///< learning rate, > 0
  double beta1 = 0.9;         ///< in [0, 1)
  double beta2 = 0.999;       ///< in [0, 1)
  double eps = 1e-8;          ///< > 0
  double weight_decay = 1e-2; ///< decoupled decay, >= 0
};

/// AdamW over every parameter a model visits. One instance per model: its moments are keyed by name.
template <class T>
class AdamW {
 public:
  explicit AdamW(AdamWConfig cfg) : cfg_(cfg), state_(2) {
    detail::require(cfg.lr > 0, "moe::optim::AdamWConfig: lr = ", cfg.lr, " must be > 0");
    detail::require(cfg.beta1 >= 0 && cfg.beta1 < 1, "moe::optim::AdamWConfig: beta1 = ", cfg.beta1,
                    " must be in [0, 1)");
    detail::require(cfg.beta2 >= 0 && cfg.beta2 < 1, "moe::optim::AdamWConfig: beta2 = ", cfg.beta2,
                    " must be in [0, 1)");
    detail::require(cfg.eps > 0, "moe::optim::AdamWConfig: eps = ", cfg.eps, " must be > 0");
    detail::require(cfg.weight_decay >= 0, "moe::optim::AdamWConfig: weight_decay = ", cfg.weight_decay,
                    " must be >= 0");
  }

  /// One update of every parameter of `model` (gradients are left as they are).
  template <class Model>
  void step(Model& model) {
    ++t_;
    model.visit_parameters([&](const std::string& name, Parameter<T>& p) { update(name, p); });
  }

  const AdamWConfig& config() const { return cfg_; }  ///< the settings
  void set_lr(double lr) { cfg_.lr = lr; }             ///< for schedules
  long steps() const { return t_; }                     ///< steps taken

 private:
  void update(const std::string& name, Parameter<T>& p) {
    const Index n = p.rows() * p.cols();
    T* w = p.data();
    const T* g = p.grad().data();
    auto& s = state_.of(name, p);
    T* m = s[0].data();
    T* v = s[1].data();
    const double bc1 = 1 - std::pow(cfg_.beta1, double(t_)), bc2 = 1 - std::pow(cfg_.beta2, double(t_));
    const T b1 = T(cfg_.beta1), b2 = T(cfg_.beta2), decay = T(1 - cfg_.lr * cfg_.weight_decay);
    const T step = T(cfg_.lr / bc1), inv_sqrt_bc2 = T(1 / std::sqrt(bc2)), eps = T(cfg_.eps);
    for (Index i = 0; i < n; ++i) {
      w[i] *= decay;
      m[i] = b1 * m[i] + (T(1) - b1) * g[i];
      v[i] = b2 * v[i] + (T(1) - b2) * g[i] * g[i];
      w[i] -= step * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
    }
  }

  AdamWConfig cfg_;
  ParameterState<T> state_;  // first and second moments per parameter
  long t_ = 0;
};

}  // namespace moe::optim
