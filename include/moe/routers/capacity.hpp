#pragma once
/// @file routers/capacity.hpp
/// @brief CapacityLimited<R>: expert capacity and token dropping on top of any token-choice router
/// (PAPERS.md A.5, Megatron `apply_inner_token_dropping`).
///
/// Each expert takes at most C = min(T, ceil(T·k / E · capacity_factor)) slots of a batch of T tokens (the
/// product evaluated in that order, in double, as Megatron does; an expert never gets more than T slots, so
/// the bound T drops nothing more but keeps C an Index: a huge factor means no limit). With MoE++'s
/// heterogeneous capacity (CapacityOptions::heterogeneous_tau = τ < 1, arXiv 2410.07348 Eq. 8) the E experts
/// split into N_FFN FFN and N_ZC zero-computation experts (RouteInput::zero_computation) and
/// C_FFN = ceil(T·k / (τ·N_FFN + N_ZC) · capacity_factor · τ), C_ZC = ceil(T·k / (τ·N_FFN + N_ZC) · capacity_factor):
/// an FFN expert takes τ times a zero-computation expert's share and the capacities still sum to
/// capacity_factor · T·k. (The paper writes T; we read it as the batch's T·k assignments, as for every capacity
/// here: with T tokens the capacities would sum to γ·T, dropping about half of the assignments at K = 2.) Over
/// capacity, the policy keeps the slots with the largest weights (`probability`; ties: lower token) or the first in
/// token order (`position`). A dropped slot gets id -1 and weight 0: the layer skips it, so it contributes nothing (the
/// token keeps its other experts and, through the residual around the layer, its input). The kept weights are not
/// renormalised (Megatron). Dropping couples the tokens of a batch: it is not causal.

#include <algorithm>
#include <cmath>
#include <utility>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../random.hpp"
#include "../routing_plan.hpp"
#include "../workspace.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// Which slots an expert over capacity keeps.
enum class DropPolicy {
  probability,  ///< the largest weights (Megatron "probs"); ties: the lower token
  position      ///< the first tokens of the batch (Megatron "position")
};

/// Capacity knobs (designated initialisers: `CapacityOptions{.capacity_factor = 1.25}`).
struct CapacityOptions {
  double capacity_factor = 1.0;  ///< C = min(T, ceil(T·k / E · capacity_factor)); finite, > 0 (huge: no limit)
  DropPolicy drop_policy = DropPolicy::probability;  ///< which slots stay
  /// MoE++ Eq. 8 τ: an FFN expert's capacity is τ times a zero-computation expert's (see the file comment;
  /// MoE++: 0.75 with capacity_factor γ = 1.1). 1: every expert alike. In (0, 1].
  double heterogeneous_tau = 1.0;
};

/// A token-choice router whose experts have a capacity.
/// @tparam R the router (moe::Router; TrainableRouter for route_backward). Its backward must accept the
///           ids it chose, with zero gradient on slots that were dropped.
template <class R>
class CapacityLimited : public RouterWrapper<R> {
  static_assert(Router<R>, "moe::routers::CapacityLimited<R>: R must model moe::Router (a token-choice router, e.g. "
                           "TopKRouter or WithLosses<TopKRouter, ...>)");
  using Base = RouterWrapper<R>;
  using Base::inner_;

 public:
  using Base::d_model;
  using Base::n_experts;
  using Base::top_k;
  using typename Base::Scalar;
  using T = Scalar;

  /// @param router the inner router; @param options capacity knobs (throws moe::Error naming a bad field)
  CapacityLimited(R router, const CapacityOptions& options) : Base(std::move(router)), options_(options) {
    moe::detail::require_in(options.capacity_factor, moe::detail::k_positive, "moe::routers::CapacityLimited",
                            "options.capacity_factor");
    moe::detail::require_in(options.heterogeneous_tau, {.lo = 0.0, .hi = 1.0, .open_lo = true},
                            "moe::routers::CapacityLimited", "options.heterogeneous_tau");
  }

  /// The inner router's saved block, then the ids it chose, before dropping, for backward.
  struct Saved {
    typename R::Saved inner{};
    Index* chosen = nullptr;  ///< (n_tokens, top_k) the inner router's ids
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const {
    Saved s;
    s.inner = inner_.carve_saved(arena, n_tokens);
    s.chosen = arena.take<Index>(n_tokens * top_k());
    return s;
  }
  const CapacityOptions& options() const { return options_; }  ///< the knobs

  /// Slots an expert may take in a batch of n_tokens: min(n_tokens, ceil(n_tokens·k / E · capacity_factor)),
  /// bounded in double before the conversion, so any valid factor gives an Index in [1, n_tokens] (n_tokens > 0).
  /// With heterogeneous_tau < 1 and n_zero_computation of the E experts zero-computation: E becomes
  /// τ·N_FFN + N_ZC and an FFN expert's (zero_computation false) capacity is τ times that.
  Index capacity(Index n_tokens, bool zero_computation = false, Index n_zero_computation = 0) const {
    const double tau = options_.heterogeneous_tau;
    const double share = tau == 1.0 ? static_cast<double>(n_experts())
                                    : tau * static_cast<double>(n_experts() - n_zero_computation) +
                                          static_cast<double>(n_zero_computation);
    const double c = std::ceil(static_cast<double>(n_tokens) * static_cast<double>(top_k()) / share *
                               options_.capacity_factor * (zero_computation ? 1.0 : tau));
    return static_cast<Index>(std::min(c, static_cast<double>(n_tokens)));
  }

  /// Routes with the inner router (whose reports, e.g. loss values, pass through: the losses see the choice
  /// before dropping), then drops what exceeds the capacity (see the file comment); out.dropped_slots counts
  /// the slots dropped.
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = in.n_tokens(), k = top_k(), E = n_experts();
    Index* ids = out.ids;
    T* weights = out.weights;
    const std::size_t mark = arena.used();
    auto inner = out.with_saved(out.saved.inner);
    inner_.route(in, inner, arena);
    out.take_reports(inner);
    out.dropped_slots = 0;
    arena.rewind(mark);
    RoutingPlan plan = RoutingPlan::carve(arena, n_tokens, k, E);
    Index* order = arena.take<Index>(n_tokens * k);  // (n_tokens * top_k) grouped rows, reordered per expert
    if (arena.measuring() || n_tokens == 0) return;

    std::copy_n(ids, n_tokens * k, out.saved.chosen);
    plan.build(ids);
    const auto zero_computation = [&](Index e) {
      return static_cast<std::size_t>(e) < in.zero_computation.size() &&
             in.zero_computation[static_cast<std::size_t>(e)];
    };
    Index n_zero_computation = 0;
    for (Index e = 0; e < E; ++e) n_zero_computation += zero_computation(e) ? 1 : 0;
    Index dropped = 0;
    MOE_OMP(omp parallel for schedule(static) reduction(+ : dropped) if(double(n_tokens) * double(k) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < E; ++e) {
      const Index first = plan.offsets[e], n = plan.offsets[e + 1] - first;
      const Index cap = capacity(n_tokens, zero_computation(e), n_zero_computation);
      if (n <= cap) continue;
      // Slot of each of the expert's rows: its token's slot holding e (a token picks an expert once).
      const auto slot_of = [&](Index row) {
        const Index t = plan.row_token[row];
        return t * k + (std::find(ids + t * k, ids + (t + 1) * k, e) - (ids + t * k));
      };
      Index* rows = order + first;  // (n,) this expert's rows, in token order
      for (Index r = 0; r < n; ++r) rows[r] = first + r;
      if (options_.drop_policy == DropPolicy::probability) {
        std::sort(rows, rows + n, [&](Index a, Index b) {
          const T wa = weights[slot_of(a)], wb = weights[slot_of(b)];
          return wa != wb ? wa > wb : a < b;
        });
      }
      for (Index r = cap; r < n; ++r) {
        const Index slot = slot_of(rows[r]);
        ids[slot] = -1;
        weights[slot] = T(0);
      }
      dropped += n - cap;
    }
    out.dropped_slots = dropped;
  }

  /// Backward through the inner router with the ids it chose; dropped slots (weight constantly 0) pass no
  /// gradient of their own, but a renormalising router still sees them in its sum.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens(), k = top_k();
    T* dkept = arena.take<T>(n_tokens * k);  // (n_tokens, top_k) dweights, 0 where dropped
    if (!arena.measuring())
      for (Index i = 0; i < n_tokens * k; ++i) dkept[i] = out.ids[i] >= 0 ? grad.dweights[i] : T(0);
    auto inner = out.with_saved(out.saved.inner);
    inner.ids = out.saved.chosen;
    RouteGradient<T> kept = grad;
    kept.dweights = dkept;
    inner_.route_backward(in, inner, kept, arena);
  }

 private:
  CapacityOptions options_;
};

}  // namespace moe::routers
