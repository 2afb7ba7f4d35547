#pragma once
/// @file optim/grad_clip.hpp
/// @brief Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_.

#include <cmath>
#include <string>

#include "../config.hpp"
#include "../parameter.hpp"

namespace moe::optim {

/// Scales every gradient of `model` by min(1, max_norm / (norm + 1e-6)), norm being the L2 norm of all
/// gradients together (summed in double, in visit order). Returns that norm (before clipping); a
/// non-finite norm is returned and nothing is scaled, so the caller can skip the step. max_norm must be finite
/// and > 0 (moe::Error otherwise).
template <class Model>
double clip_grad_norm(Model& model, double max_norm) {
  detail::require_in(max_norm, detail::k_positive, "moe::optim::clip_grad_norm", "max_norm");
  double sum = 0;
  model.visit_parameters([&](const std::string&, auto& p) {
    const auto g = p.grad();
    for (Index i = 0; i < g.rows() * g.cols(); ++i) sum += double(g.data()[i]) * double(g.data()[i]);
  });
  const double norm = std::sqrt(sum);
  if (!std::isfinite(norm)) return norm;
  const double scale = max_norm / (norm + 1e-6);
  if (scale < 1) {
    model.visit_parameters([&](const std::string&, auto& p) {
      const auto g = p.grad();
      using T = std::remove_cvref_t<decltype(*g.data())>;
      for (Index i = 0; i < g.rows() * g.cols(); ++i) g.data()[i] *= T(scale);
    });
  }
  return norm;
}

}  // namespace moe::optim
