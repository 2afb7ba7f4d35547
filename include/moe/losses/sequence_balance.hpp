#pragma once
/// @file losses/sequence_balance.hpp
/// @brief DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437; Megatron `seq_aux_loss`).

#include "balance_batch.hpp"

namespace moe::losses {

/// The Switch form inside each sequence, averaged over sequences: L = coeff · W · (1/S) Σ_s Σ_c f_sc P_sc with
/// f_sc the fraction of sequence s's slots routed to c and P_sc its mean probability (DeepSeek-V3 writes
/// f' = W f, the same value). Sequences come from the layer's `sequence_starts`; without them the batch is one
/// sequence (then this equals SwitchLoss). Sequences must be contiguous runs of tokens, as the layer makes them.
struct SequenceBalanceLoss {
  double coeff = 1e-4;  ///< α (DeepSeek-V3: 1e-4); finite, >= 0

  /// Throws moe::Error unless coeff is finite and >= 0 (routers::WithLosses calls it on construction).
  void validate() const {
    moe::detail::require_in(coeff, moe::detail::k_non_negative, "moe::losses::SequenceBalanceLoss", "coeff");
  }

  /// Value; adds dL/dp to dp. Scratch: 2 · width doubles.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    validate();
    double* f = arena.take<double>(b.width);
    double* scratch = arena.take<double>(b.width);
    if (arena.measuring() || b.n_tokens == 0) return 0;
    const auto seq = [&](Index t) { return b.sequence_of_token == nullptr ? Index(0) : b.sequence_of_token[t]; };
    Index n_sequences = 0;
    for (Index t0 = 0; t0 < b.n_tokens; ++n_sequences)
      for (const Index s = seq(t0); t0 < b.n_tokens && seq(t0) == s;) ++t0;
    double value = 0;
    for (Index t0 = 0, t1 = 0; t0 < b.n_tokens; t0 = t1) {
      for (t1 = t0; t1 < b.n_tokens && seq(t1) == seq(t0);) ++t1;
      std::fill_n(f, b.width, 0.0);
      count_columns(b, t0, t1, f);
      to_fractions(f, b.width);
      value += switch_form(b, t0, t1, f, coeff * double(b.width) / double(n_sequences), 1.0, scratch, dp);
    }
    return value;
  }
};

}  // namespace moe::losses
