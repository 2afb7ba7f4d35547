#pragma once
/// @file losses/switch_loss.hpp
/// @brief The Switch/GShard micro-batch load-balancing loss (PAPERS.md A.5, Megatron's form), with MoE++'s
/// heterogeneous weighting of zero-computation experts (A.2).

#include "balance_batch.hpp"

namespace moe::losses {

/// L = coeff · W · Σ_c η_c f_c P_c over the batch: f_c the fraction of the batch's slots routed to column c
/// (Σf = 1), P_c the mean routing probability of c, W the columns, η_c = zero_computation_weight (MoE++ τ)
/// for zero-computation experts and 1 otherwise. Uniform routing gives exactly coeff; every token on one
/// expert with probability 1 gives coeff · W.
struct SwitchLoss {
  double coeff = 1e-2;                   ///< α (Switch: 1e-2); finite, >= 0
  double zero_computation_weight = 1.0;  ///< τ on MoE++ zero/copy/constant experts (1: an ordinary expert);
                                         ///< finite, >= 0

  /// Throws moe::Error naming a field that is not finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::SwitchLoss", "coeff");
    moe::detail::require_in(zero_computation_weight, moe::detail::k_non_negative, "moe::losses::SwitchLoss",
                            "zero_computation_weight");
  }

  /// Value; adds dL/dp to dp. Scratch: 2 · width doubles from `arena`.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    validate();
    double* f = arena.take<double>(b.width);
    double* scratch = arena.take<double>(b.width);
    if (arena.measuring() || b.n_tokens == 0) return 0;
    std::fill_n(f, b.width, 0.0);
    count_columns(b, 0, b.n_tokens, f);
    to_fractions(f, b.width);
    return switch_form(b, 0, b.n_tokens, f, coeff * double(b.width), zero_computation_weight, scratch, dp);
  }
};

}  // namespace moe::losses
