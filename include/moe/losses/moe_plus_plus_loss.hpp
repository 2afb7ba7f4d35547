#pragma once
/// @file losses/moe_plus_plus_loss.hpp
/// @brief MoE++'s heterogeneous load-balancing loss (arXiv 2410.07348, Eq. 7 and 9; PAPERS.md E.1, verified
/// against the paper's text): zero-computation experts weighted by τ, no factor of the expert count.

#include "balance_batch.hpp"

namespace moe::losses {

/// L = coeff · Σ_i η_i f_i P_i over the FFN and zero-computation experts, with f_i = (1/T) Σ_t 1{token t chose
/// expert i} counted per token (Σ f = K), P_i the mean routing probability, η_i = tau for zero-computation
/// experts (RouteInput::zero_computation: MoE++'s zero, copy and constant experts) and 1 for FFN experts. The
/// paper: coeff (β) = 0.01, τ = 0.75 (smaller τ sends more tokens to zero-computation experts). Unlike SwitchLoss
/// there is no factor of the expert count: at uniform routing over E experts L = coeff · K / E (τ = 1).
struct MoEPlusPlusLoss {
  double coeff = 1e-2;  ///< β; finite, >= 0
  double tau = 0.75;    ///< τ, the weight of zero-computation experts; finite, >= 0

  /// Throws moe::Error naming a field that is not finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::MoEPlusPlusLoss", "coeff");
    moe::detail::require_in(tau, moe::detail::k_non_negative, "moe::losses::MoEPlusPlusLoss", "tau");
  }

  /// Value; adds dL/dp = coeff · η_c f_c / T to dp. Scratch: 2 · width doubles from `arena`.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    validate();
    const auto [f, scratch] = column_counts(b, arena);
    if (f == nullptr) return 0;
    for (Index c = 0; c < b.width; ++c) f[c] /= double(b.n_tokens);  // per token: Σ f = K
    return switch_form(b, 0, b.n_tokens, f, coeff, tau, scratch, dp);
  }
};

}  // namespace moe::losses
