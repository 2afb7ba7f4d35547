#pragma once
/// @file optim/adamw.hpp
/// @brief AdamW (Loshchilov & Hutter) with torch.optim.AdamW's update: p *= 1 - lr wd; m = b1 m + (1-b1) g;
/// v = b2 v + (1-b2) g^2; p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "../config.hpp"
#include "../parameter.hpp"
#include "state.hpp"

namespace moe::optim {

/// Settings of AdamW (PyTorch defaults); validated by the constructor (moe::Error naming the field). Every
/// value is finite; those used as a T (lr, eps, weight_decay) are at most max(T).
struct AdamWConfig {
  double lr = 1e-3;           ///< learning rate, in (0, max(T)]
  double beta1 = 0.9;         ///< in [0, 1)
  double beta2 = 0.999;       ///< in [0, 1)
  double eps = 1e-8;          ///< in (0, max(T)]
  double weight_decay = 1e-2; ///< decoupled decay, in [0, max(T)]
};

/// AdamW over every parameter a model visits. One instance per model: its moments are keyed by name.
template <class T>
class AdamW {
 public:
  explicit AdamW(AdamWConfig cfg) : cfg_(cfg), state_(2) {
    constexpr const char* who = "moe::optim::AdamWConfig";
    const double t_max = static_cast<double>(std::numeric_limits<T>::max());
    detail::require_in(cfg.lr, {.lo = 0.0, .hi = t_max, .open_lo = true}, who, "lr");
    detail::require_in(cfg.beta1, {.lo = 0.0, .hi = 1.0, .open_hi = true}, who, "beta1");
    detail::require_in(cfg.beta2, {.lo = 0.0, .hi = 1.0, .open_hi = true}, who, "beta2");
    detail::require_in(cfg.eps, {.lo = 0.0, .hi = t_max, .open_lo = true}, who, "eps");
    detail::require_in(cfg.weight_decay, {.lo = 0.0, .hi = t_max}, who, "weight_decay");
  }

  /// One update of every parameter of `model` (gradients are left as they are).
  template <class Model>
  void step(Model& model) {
    ++t_;
    model.visit_parameters([&](const std::string& name, Parameter<T>& p) { update(name, p); });
  }

  const AdamWConfig& config() const { return cfg_; }  ///< the settings
  /// For schedules; lr as AdamWConfig::lr (moe::Error otherwise).
  void set_lr(double lr) {
    detail::require_in(lr, {.lo = 0.0, .hi = static_cast<double>(std::numeric_limits<T>::max()), .open_lo = true},
                       "moe::optim::AdamW::set_lr", "lr");
    cfg_.lr = lr;
  }
  long steps() const { return static_cast<long>(t_); }  ///< steps taken

  /// The optimizer's state for `model`, to save and resume: f(name + ".exp_avg", std::span<T>) and f(name +
  /// ".exp_avg_sq", ...) per parameter (PyTorch's names; created zero if not stepped yet), then f("step",
  /// std::span<std::int64_t>).
  template <class Model, class F>
  void visit_state(Model& model, F&& f) {
    static constexpr const char* k_buffers[] = {"exp_avg", "exp_avg_sq"};
    state_.visit(model, k_buffers, f);
    f(std::string("step"), std::span<std::int64_t>(&t_, 1));
  }

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
  std::int64_t t_ = 0;
};

}  // namespace moe::optim
