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
/// the slots routed to c over all micro-batches since the last reset(), this one included. Each *training*
/// forward adds its slot counts to a persistent buffer (after the optional all-reduce hook, so the buffer
/// holds the counts of every process); an inference forward reads the buffer plus its own counts and changes
/// nothing. Backward never touches the buffer. Call reset() once per optimizer step. A forward that recomputes
/// a micro-batch already counted (activation checkpointing) runs inside set_recomputing(true): it neither
/// counts nor communicates, and reads f from the buffer as it is, so it reproduces the original value
/// (torchtitan PR #4772's double-count trap).
///
/// Not for concurrent training forwards: the buffer is shared state (the layer's other paths stay const-safe).
class GlobalBatchLoss {
 public:
  /// @param coeff α (Qwen: the same 1e-3..1e-2 range as the micro-batch loss); finite, >= 0
  explicit GlobalBatchLoss(double coeff = 1e-2) : coeff_(coeff) { validate(); }
  /// Throws moe::Error when coeff is not finite and >= 0.
  void validate() const {
    moe::detail::require_in(coeff_, moe::detail::k_non_negative, "moe::losses::GlobalBatchLoss", "coeff");
  }

  /// Called with each training forward's counts (one per column) before they enter the buffer: an
  /// all-reduce over the processes of a data- or expert-parallel group goes here. Empty: local counts.
  void set_all_reduce(std::function<void(std::span<double>)> hook) { all_reduce_ = std::move(hook); }

  /// Forgets the accumulated counts: call once per optimizer step (after the last backward of the step).
  void reset() {
    std::fill(counts_.begin(), counts_.end(), 0.0);
    micro_batches_ = 0;
  }
  /// While on, training forwards are recomputations of counted micro-batches: see the class comment.
  void set_recomputing(bool on) { recomputing_ = on; }
  bool recomputing() const { return recomputing_; }  ///< whether forwards are recomputations

  /// Slots per column accumulated since reset() (empty before the first forward).
  std::span<const double> counts() const { return counts_; }
  /// Training forwards since reset().
  long micro_batches() const { return micro_batches_; }
  double coeff() const { return coeff_; }  ///< α

  /// Value; adds dL/dp to dp. Scratch: 2 · width doubles. The first training forward sizes the buffer (no
  /// allocation after); inference forwards only read it.
  template <class T>
  double forward(const BalanceBatch<T>& b, T* dp, T* /*dz*/, Arena& arena) const {
    double* f = arena.take<double>(b.width);
    double* scratch = arena.take<double>(b.width);
    if (arena.measuring() || b.n_tokens == 0) return 0;
    // Only a training forward sizes the buffer: inference forwards may run concurrently (the layer's forward
    // is const) and must not write it, not even on the first call.
    const bool sized = counts_.size() == static_cast<std::size_t>(b.width);
    if (b.training && !sized) counts_.assign(static_cast<std::size_t>(b.width), 0.0);
    std::fill_n(f, b.width, 0.0);
    count_columns(b, 0, b.n_tokens, f);
    if (b.training && !recomputing_) {
      if (all_reduce_) all_reduce_(std::span<double>(f, static_cast<std::size_t>(b.width)));
      for (Index c = 0; c < b.width; ++c) counts_[static_cast<std::size_t>(c)] += f[c];
      ++micro_batches_;
    }
    if (b.training) {  // f = the buffer (this micro-batch included)
      for (Index c = 0; c < b.width; ++c) f[c] = counts_[static_cast<std::size_t>(c)];
    } else if (sized) {  // an unsized buffer holds no counts yet
      for (Index c = 0; c < b.width; ++c) f[c] += counts_[static_cast<std::size_t>(c)];
    }
    to_fractions(f, b.width);
    return switch_form(b, 0, b.n_tokens, f, coeff_ * double(b.width), 1.0, scratch, dp);
  }

 private:
  double coeff_;
  std::function<void(std::span<double>)> all_reduce_;
  mutable std::vector<double> counts_;  // the persistent buffer (mutable: forward is const)
  mutable long micro_batches_ = 0;
  bool recomputing_ = false;
};

}  // namespace moe::losses
