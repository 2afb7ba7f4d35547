#pragma once
/// @file optim/sgd.hpp
/// @brief Stochastic gradient descent with momentum and L2 weight decay, with PyTorch's torch.optim.SGD
/// update: g += wd p; b = mu b + g (b = g at the first step); p -= lr (nesterov ? g + mu b : b).

#include <string>

#include "../config.hpp"
#include "../parameter.hpp"
#include "state.hpp"

namespace moe::optim {

/// Settings of SGD; validated by the constructor (moe::Error naming the field).
struct SGDConfig {
  double lr = 1e-2;          ///< learning rate, > 0
  double momentum = 0.0;     ///< in [0, 1)
  double weight_decay = 0.0; ///< L2 penalty added to the gradient, >= 0
  bool nesterov = false;     ///< Nesterov momentum (needs momentum > 0)
};

/// SGD over every parameter a model visits. One instance per model: its momentum is keyed by name.
template <class T>
class SGD {
 public:
  explicit SGD(SGDConfig cfg) : cfg_(cfg), state_(1) {
    detail::require(cfg.lr > 0, "moe::optim::SGDConfig: lr = ", cfg.lr, " must be > 0");
    detail::require(cfg.momentum >= 0 && cfg.momentum < 1, "moe::optim::SGDConfig: momentum = ", cfg.momentum,
                    " must be in [0, 1)");
    detail::require(cfg.weight_decay >= 0, "moe::optim::SGDConfig: weight_decay = ", cfg.weight_decay,
                    " must be >= 0");
    detail::require(!cfg.nesterov || cfg.momentum > 0, "moe::optim::SGDConfig: nesterov needs momentum > 0");
  }

  /// One update of every parameter of `model` from its accumulated gradient (gradients are left as they are).
  template <class Model>
  void step(Model& model) {
    model.visit_parameters([&](const std::string& name, Parameter<T>& p) { update(name, p); });
    first_ = false;
  }

  const SGDConfig& config() const { return cfg_; }  ///< the settings
  void set_lr(double lr) { cfg_.lr = lr; }           ///< for schedules

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
        b[i] = first_ ? d : mu * b[i] + d;
        d = cfg_.nesterov ? d + mu * b[i] : b[i];
      }
      w[i] -= lr * d;
    }
  }

  SGDConfig cfg_;
  ParameterState<T> state_;  // momentum buffer per parameter
  bool first_ = true;
};

}  // namespace moe::optim
