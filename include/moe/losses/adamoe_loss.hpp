#pragma once
/// @file losses/adamoe_loss.hpp
/// @brief AdaMoE's load-balancing loss over true and null experts (arXiv 2406.13233, Eq. 6; PAPERS.md E.2,
/// verified against the paper's text): the null experts share one frequency, so they are not balanced among
/// themselves.

#include "balance_batch.hpp"

namespace moe::losses {

/// l = coeff · (n + m) · Σ_{i=1..n+m} f̃_i P_i over the n true and m null columns (BalanceBatch::n_null), where
/// f_i = (1/T) Σ_t 1{token t chose column i} counts per token (Σ f = top_k, as the paper's f_i =
/// (1/|B|) Σ_x 1{G(x)_i ≠ 0}), P_i is the mean routing probability, f̃_i = f_i for a true expert and the mean
/// null frequency (1/m) Σ_j f_{n+j} for every null expert. The paper's coefficient runs "tight to loose"
/// (Mixtral: 0.02 in the first epoch, 1e-4 in the second). Without null columns this is Mixtral's (HF) form
/// coeff · n · Σ f_i P_i with Σ f = top_k: top_k times SwitchLoss, which normalises Σ f = 1 (Megatron).
struct AdaMoELoss {
  double coeff = 1e-2;         ///< α; finite, >= 0
  bool balance_nulls = false;  ///< each null its own f (the paper's l_bal ablation, Table 3: worse); default off

  /// Throws moe::Error naming coeff when it is not finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::AdaMoELoss", "coeff");
  }

  /// Value; adds dL/dp = coeff · (n + m) · f̃_c / T to dp. Scratch: 2 · width doubles from `arena`.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    validate();
    const auto [f, scratch] = column_counts(b, arena);
    if (f == nullptr) return 0;
    for (Index c = 0; c < b.width; ++c) f[c] /= double(b.n_tokens);  // per token: Σ f = slots used
    if (b.n_null > 0 && !balance_nulls) {
      double null_mean = 0;
      for (Index c = b.width - b.n_null; c < b.width; ++c) null_mean += f[c];
      null_mean /= double(b.n_null);
      std::fill(f + (b.width - b.n_null), f + b.width, null_mean);
    }
    return switch_form(b, 0, b.n_tokens, f, coeff * double(b.width), 1.0, scratch, dp);
  }
};

}  // namespace moe::losses
