#pragma once
/// @file losses/global_batch.hpp
/// @brief The global-batch load-balancing loss of "Demons in the Detail" (PAPERS.md A.7; Megatron
/// `global_aux_loss`): f counted over every micro-batch of an optimizer step, P from the current one.

#include <functional>
#include <span>
#include <vector>

#include "balance_batch.hpp"

namespace moe::losses {

/// L = coeff · W · Σ_c f_c P_c with P_c the current micro-batch's mean probability and f_c the fraction of
/// the slots routed to c over all micro-batches since the last reset, this one included. The counts live in
/// a moe::GlobalBatchCounts the caller owns and passes in (RouteInput::global_batch; MoELayer passes its
/// TrainingContext's, `ctx.global_batch()`): each *training* forward adds its slot counts to it (after the
/// optional all-reduce hook, so it holds the counts of every process); a forward that only reads (inference,
/// or counts.recomputing) uses them as they are plus, for inference, its own; without counts the value is
/// this micro-batch's alone. Backward never touches them. Reset the counts once per optimizer step. A forward
/// that recomputes a micro-batch already counted (activation checkpointing) runs with counts.recomputing set:
/// it neither counts nor communicates, and reads f as it is, so it reproduces the original value (torchtitan
/// PR #4772's double-count trap).
///
/// The loss itself holds no mutable state: concurrent training forwards are safe with one counts object each.
class GlobalBatchLoss {
 public:
  /// @param coeff α (Qwen: the same 1e-3..1e-2 range as the micro-batch loss); finite, >= 0
  explicit GlobalBatchLoss(double coeff = 1e-2) : coeff_(coeff) { validate(); }
  /// Throws moe::Error when coeff is not finite and >= 0.
  void validate() const {
    moe::detail::require_in(coeff_, moe::detail::k_non_negative, "moe::losses::GlobalBatchLoss", "coeff");
  }

  /// Called with each training forward's counts (one per column) before they enter the caller's counts: an
  /// all-reduce over the processes of a data- or expert-parallel group goes here. Empty: local counts.
  void set_all_reduce(std::function<void(std::span<double>)> hook) { all_reduce_ = std::move(hook); }

  double coeff() const { return coeff_; }  ///< α

  /// Value; adds dL/dp to dp. Scratch: 2 · width doubles. The first training forward sizes the counts (no
  /// allocation after); other forwards only read them.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    const auto [f, scratch] = column_counts(b, arena);
    if (f == nullptr) return 0;
    GlobalBatchCounts* g = b.global_batch;
    const bool sized = g != nullptr && g->counts.size() == static_cast<std::size_t>(b.width);
    if (b.training && g != nullptr) {
      if (!sized) g->counts.assign(static_cast<std::size_t>(b.width), 0.0);
      if (!g->recomputing) {
        if (all_reduce_) all_reduce_(std::span<double>(f, static_cast<std::size_t>(b.width)));
        for (Index c = 0; c < b.width; ++c) g->counts[static_cast<std::size_t>(c)] += f[c];
        ++g->micro_batches;
      }
      for (Index c = 0; c < b.width; ++c) f[c] = g->counts[static_cast<std::size_t>(c)];  // this one included
    } else if (sized) {  // inference: the counts so far plus its own
      for (Index c = 0; c < b.width; ++c) f[c] += g->counts[static_cast<std::size_t>(c)];
    }
    to_fractions(f, b.width);
    return switch_form(b, 0, b.n_tokens, f, coeff_ * double(b.width), 1.0, scratch, dp);
  }

 private:
  double coeff_;
  std::function<void(std::span<double>)> all_reduce_;
};

}  // namespace moe::losses
