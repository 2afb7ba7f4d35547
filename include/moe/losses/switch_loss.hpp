#pragma once
/// @file losses/switch_loss.hpp
/// @brief The Switch/GShard micro-batch load-balancing loss (PAPERS.md A.5, Megatron's form). MoE++'s
/// heterogeneous form is losses::MoEPlusPlusLoss, AdaMoE's losses::AdaMoELoss.

#include "balance_batch.hpp"

namespace moe::losses {

/// L = coeff · W · Σ_c f_c P_c over the batch: f_c the fraction of the batch's slots routed to column c
/// (Σf = 1, Megatron; Hugging Face's Mixtral counts per token, Σf = k, which is k times this), P_c the mean
/// routing probability of c, W the columns. Uniform routing gives exactly coeff; every token on one expert with
/// probability 1 gives coeff · W.
struct SwitchLoss {
  double coeff = 1e-2;  ///< α (Switch: 1e-2); finite, >= 0

  /// Throws moe::Error naming coeff when it is not finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::SwitchLoss", "coeff");
  }

  /// Value; adds dL/dp to dp. Scratch: 2 · width doubles from `arena`.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    validate();
    const auto [f, scratch] = column_counts(b, arena);
    if (f == nullptr) return 0;
    to_fractions(f, b.width);
    return switch_form(b, 0, b.n_tokens, f, coeff * double(b.width), 1.0, scratch, dp);
  }
};

}  // namespace moe::losses
