#pragma once
/// @file route_io.hpp
/// @brief What a router and its caller exchange (moe::Router's one call): RouteInput in, RouteOutput out, and
/// RouteGradient for the backward. Every router takes these three types, so a wrapper passes what it does
/// not change on unchanged and the layer calls every router the same way.
///
/// A router declares the layout of what its backward needs as a type, `R::Saved` (pointers into an Arena,
/// carved by `carve_saved`), and a wrapper composes it with its own (e.g. CapacityLimited's `{inner, chosen}`).

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "config.hpp"
#include "workspace.hpp"

namespace moe {

/// Most loss values a route() reports (one per loss policy of routers::WithLosses).
inline constexpr Index k_max_losses = 8;

/// Slot counts per balance column accumulated over the training forwards of one optimizer step: what
/// losses::GlobalBatchLoss reads and advances. Mutable state the caller owns and passes in (MoELayer passes
/// its TrainingContext's), so a const forward writes nothing shared: concurrent training forwards with one
/// context each are safe. reset() after the step's last backward.
struct GlobalBatchCounts {
  std::vector<double> counts;  ///< slots per column since reset() (sized by the first training forward)
  long micro_batches = 0;      ///< training forwards counted since reset()
  /// While true, training forwards recompute micro-batches already counted (activation checkpointing): they
  /// neither count nor communicate, and read f as it is.
  bool recomputing = false;

  /// Forgets the counts (keeps the buffer: no allocation after the first step).
  void reset() {
    std::fill(counts.begin(), counts.end(), 0.0);
    micro_batches = 0;
  }
};

/// The Saved block of a router whose backward needs nothing beyond ids, weights and x (or that has none).
struct NothingSaved {};

/// What a router reads: the rows to route and what the caller knows about the batch.
template <class T>
struct RouteInput {
  ConstMatrixView<T> x{};  ///< (n_tokens, d_model) the rows routed
  bool training = false;   ///< a training forward (stateful losses, e.g. global-batch counts, advance only then)
  /// (n_tokens) the sequence of each token of a packed batch, values in [0, n_sequences), or nullptr when the
  /// caller gave no sequences (sequence-level routing then routes each token alone; sequence-wise losses
  /// treat the batch as one sequence).
  const Index* sequence_of_token = nullptr;
  Index n_sequences = 0;  ///< sequences of the batch when sequence_of_token is given
  /// (n_tokens, n_experts) the previous layer's gate logits (MoE++ gating residual; moe::Stack passes them),
  /// or empty: none (the first layer, or a router that reads none).
  ConstMatrixView<T> previous_logits{};
  /// (n_experts) 1 for zero-computation experts (MoE++: loss policies weight them by τ), or empty: none.
  std::span<const std::uint8_t> zero_computation{};
  /// The caller's global-batch counts (a training forward advances them), or nullptr: none.
  GlobalBatchCounts* global_batch = nullptr;

  Index n_tokens() const { return x.rows(); }  ///< rows routed
};

/// What a router writes. The caller carves it (carve_route_output): ids and weights, (n_tokens, top_k), and the
/// router's Saved block; the router fills them and the reports below.
template <class T, class Saved>
struct RouteOutput {
  Index* ids = nullptr;  ///< (n_tokens, top_k) expert of each slot in [0, n_experts), or -1 for an unused slot
  T* weights = nullptr;  ///< (n_tokens, top_k) combine weight of each slot
  Saved saved{};         ///< what the router's backward needs, in the router's own layout
  /// In: where the router writes the logits it routed on (n_tokens, n_experts), for the next layer's gating
  /// residual; empty: nowhere. Only routers that pass logits on (routers::GatingResidual) write it.
  MatrixView<T> logits{};
  Index dropped_slots = 0;                    ///< out: slots dropped for capacity
  std::array<double, k_max_losses> losses{};  ///< out: each loss policy's value (coefficient included), in order
  Index n_losses = 0;                         ///< out: losses reported

  /// The same ids, weights and logits with another Saved block: what a wrapper hands its inner router.
  template <class Inner>
  RouteOutput<T, Inner> with_saved(const Inner& inner) const {
    RouteOutput<T, Inner> o;
    o.ids = ids;
    o.weights = weights;
    o.saved = inner;
    o.logits = logits;
    return o;
  }
  /// Takes the reports (dropped slots, losses) of an inner router's output.
  template <class Inner>
  void take_reports(const RouteOutput<T, Inner>& inner) {
    dropped_slots = inner.dropped_slots;
    losses = inner.losses;
    n_losses = inner.n_losses;
  }
};

/// The gradients of a route's backward.
template <class T>
struct RouteGradient {
  const T* dweights = nullptr;       ///< in: (n_tokens, top_k) dL/dweights
  ConstMatrixView<T> dlogits{};      ///< in: dL/d(RouteOutput::logits) from the next layer, or empty
  MatrixView<T> dx{};                ///< out: dL/dx, ADDED (n_tokens, d_model)
  MatrixView<T> dprevious_logits{};  ///< out: dL/d(RouteInput::previous_logits), ADDED, or empty: dropped
};

/// The RouteOutput of router type R.
template <class R>
using RouteOutputOf = RouteOutput<typename R::Scalar, typename R::Saved>;

/// Carves ids, weights and the Saved block of router r for n_tokens from `arena` (or measures them).
template <class R>
RouteOutputOf<R> carve_route_output(const R& r, Arena& arena, Index n_tokens) {
  RouteOutputOf<R> out;
  out.ids = arena.take<Index>(n_tokens * r.top_k());
  out.weights = arena.take<typename R::Scalar>(n_tokens * r.top_k());
  out.saved = r.carve_saved(arena, n_tokens);
  return out;
}

/// True for routers that read RouteInput::previous_logits and write RouteOutput::logits (routers::GatingResidual
/// and wrappers around one); moe::Stack then passes logits from layer to layer. A wrapper declares its inner
/// router as `using Inner = R;` and whether it passes logits itself as `static constexpr bool passes_logits`
/// (routers::RouterWrapper declares both), and the property goes through any depth of wrappers.
template <class R>
inline constexpr bool links_logits = false;
template <class R>
requires requires {
  typename R::Inner;
}
inline constexpr bool links_logits<R> = R::passes_logits || links_logits<typename R::Inner>;

}  // namespace moe
