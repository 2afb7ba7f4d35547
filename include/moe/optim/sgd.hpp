#pragma once
/// @file optim/sgd.hpp
/// @brief Stochastic gradient descent with momentum and L2 weight decay, with PyTorch's torch.optim.SGD
/// update: g += wd p; b = mu b + g (b = g at the first step); p -= lr (nesterov ? g + mu b : b).

#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "../config.hpp"
#include "../parameter.hpp"
#include "state.hpp"

namespace moe::optim {

/// Settings of SGD; validated by the constructor (moe::Error naming the field). Every value is finite and, as
/// each is used as a T, at most max(T).
struct SGDConfig {
  double lr = 1e-2;          ///< learning rate, in (0, max(T)]
  double momentum = 0.0;     ///< in [0, 1)
  double weight_decay = 0.0; ///< L2 penalty added to the gradient, in [0, max(T)]
  bool nesterov = false;     ///< Nesterov momentum (needs momentum > 0)
};

/// SGD over every parameter a model visits. One instance per model: its momentum is keyed by name.
template <class T>
class SGD {
 public:
  explicit SGD(SGDConfig cfg) : cfg_(cfg), state_(1) {
    constexpr const char* who = "moe::optim::SGDConfig";
    const double t_max = static_cast<double>(std::numeric_limits<T>::max());
    detail::require_in(cfg.lr, {.lo = 0.0, .hi = t_max, .open_lo = true}, who, "lr");
    detail::require_in(cfg.momentum, {.lo = 0.0, .hi = 1.0, .open_hi = true}, who, "momentum");
    detail::require_in(cfg.weight_decay, {.lo = 0.0, .hi = t_max}, who, "weight_decay");
    detail::require(!cfg.nesterov || cfg.momentum > 0, "moe::optim::SGDConfig: nesterov needs momentum > 0");
  }

  /// One update of every parameter of `model` from its accumulated gradient (gradients are left as they are).
  template <class Model>
  void step(Model& model) {
    model.visit_parameters([&](const std::string& name, Parameter<T>& p) { update(name, p); });
    ++steps_;
  }

  /// The optimizer's state for `model`, to save and resume: f(name + ".momentum_buffer", std::span<T>) per
  /// parameter when momentum > 0 (PyTorch's name), then f("step", std::span<std::int64_t>).
  template <class Model, class F>
  void visit_state(Model& model, F&& f) {
    static constexpr const char* k_buffers[] = {"momentum_buffer"};
    if (cfg_.momentum > 0) state_.visit(model, k_buffers, f);
    f(std::string("step"), std::span<std::int64_t>(&steps_, 1));
  }

  const SGDConfig& config() const { return cfg_; }  ///< the settings
  /// For schedules; lr as SGDConfig::lr (moe::Error otherwise).
  void set_lr(double lr) {
    detail::require_in(lr, {.lo = 0.0, .hi = static_cast<double>(std::numeric_limits<T>::max()), .open_lo = true},
                       "moe::optim::SGD::set_lr", "lr");
    cfg_.lr = lr;
  }

 private:
  void update(const std::string& name, Parameter<T>& p) {
    const Index n = p.rows() * p.cols();
    T* w = p.data();
    const T* g = p.grad().data();
    T* b = cfg_.momentum > 0 ? state_.of(name, p)[0].data() : nullptr;
    const T lr = T(cfg_.lr), mu = T(cfg_.momentum), wd = T(cfg_.weight_decay);
    for (Index i = 0; i < n; ++i) {
      T d = g[i] + wd * w[i];
      if (b != nullptr) {
        b[i] = steps_ == 0 ? d : mu * b[i] + d;
        d = cfg_.nesterov ? d + mu * b[i] : b[i];
      }
      w[i] -= lr * d;
    }
  }

  SGDConfig cfg_;
  ParameterState<T> state_;  // momentum buffer per parameter
  std::int64_t steps_ = 0;   // steps taken (the first sets the momentum buffer)
};

}  // namespace moe::optim
