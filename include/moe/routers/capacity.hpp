#pragma once
/// @file routers/capacity.hpp
/// @brief CapacityLimited<R>: expert capacity and token dropping on top of any token-choice router
/// (PAPERS.md A.5, Megatron `apply_inner_token_dropping`).
///
/// Each expert takes at most C = min(T, ceil(T·k / E · capacity_factor)) slots of a batch of T tokens (the
/// product evaluated in that order, in double, as Megatron does; an expert never gets more than T slots, so
/// the bound T drops nothing more but keeps C an Index: a huge factor means no limit). Over capacity, the
/// policy keeps the slots with the largest weights (`probability`; ties: lower token) or the first in token
/// order (`position`). A dropped slot gets id -1 and weight 0: the layer skips it, so it contributes nothing
/// (the token keeps its other experts and, through the residual around the layer, its input). The kept
/// weights are not renormalised (Megatron). Dropping couples the tokens of a batch: it is not causal.

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

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
    constexpr const char* who = "moe::routers::CapacityLimited";
    moe::detail::require_in(options.capacity_factor, moe::detail::k_positive, who, "options.capacity_factor");
    // backward reads the chosen ids back from `saved`, stored as Scalar: each must be exact.
    constexpr Index exact = Index{1} << std::numeric_limits<Scalar>::digits;
    moe::detail::require(inner_.n_experts() <= exact, who, ": n_experts = ", inner_.n_experts(),
                         " exceeds the ", exact, " expert ids a ", sizeof(Scalar), "-byte Scalar holds exactly");
  }

  /// The inner router's saved block, then the ids it chose (as Scalar; exact below 2^24) for backward.
  Index saved_width() const { return inner_.saved_width() + inner_.top_k(); }
  const CapacityOptions& options() const { return options_; }  ///< the knobs

  /// Slots each expert may take in a batch of n_tokens: min(n_tokens, ceil(n_tokens·k / E · capacity_factor)),
  /// bounded in double before the conversion, so any valid factor gives an Index in [1, n_tokens] (n_tokens > 0).
  Index capacity(Index n_tokens) const {
    const double c = std::ceil(static_cast<double>(n_tokens) * static_cast<double>(top_k()) /
                               static_cast<double>(n_experts()) * options_.capacity_factor);
    return static_cast<Index>(std::min(c, static_cast<double>(n_tokens)));
  }

  /// Forwards the zero-computation experts to an inner router with balance losses (MoE++ τ weighting).
  void set_zero_computation_mask(const std::vector<bool>& mask)
    requires requires(R& r) { r.set_zero_computation_mask(mask); }
  {
    inner_.set_zero_computation_mask(mask);
  }

  /// Routes with the inner router, then drops what exceeds the capacity (see the file comment).
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena) const {
    RouteStats stats;
    route(x, ids, weights, saved, arena, stats);
  }

  /// As above, and reports the number of dropped slots in `stats`.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena, RouteStats& stats) const {
    const Index n_tokens = x.rows(), k = top_k(), E = n_experts();
    const std::size_t mark = arena.used();
    if constexpr (requires { inner_.route(x, ids, weights, saved, arena, stats); }) {
      inner_.route(x, ids, weights, saved, arena, stats);  // e.g. balance losses, on the choice before dropping
    } else {
      inner_.route(x, ids, weights, saved, arena);
    }
    stats.dropped_slots = 0;
    arena.rewind(mark);
    RoutingPlan plan = RoutingPlan::carve(arena, n_tokens, k, E);
    Index* order = arena.take<Index>(n_tokens * k);  // (n_tokens * top_k) grouped rows, reordered per expert
    if (arena.measuring() || n_tokens == 0) return;

    T* chosen = saved + n_tokens * inner_.saved_width();  // (n_tokens, top_k) ids before dropping
    for (Index i = 0; i < n_tokens * k; ++i) chosen[i] = static_cast<T>(ids[i]);
    plan.build(ids);
    const Index cap = capacity(n_tokens);
    Index dropped = 0;
    MOE_OMP(omp parallel for schedule(static) reduction(+ : dropped) if(double(n_tokens) * double(k) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < E; ++e) {
      const Index first = plan.offsets[e], n = plan.offsets[e + 1] - first;
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
    stats.dropped_slots = dropped;
  }

  /// Backward through the inner router with the ids it chose; dropped slots (weight constantly 0) pass no
  /// gradient of their own, but a renormalising router still sees them in its sum.
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* weights, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena) {
    const Index n_tokens = x.rows(), k = top_k();
    Index* chosen = arena.take<Index>(n_tokens * k);  // (n_tokens, top_k) ids before dropping
    T* dkept = arena.take<T>(n_tokens * k);           // (n_tokens, top_k) dweights, 0 where dropped
    if (!arena.measuring() && n_tokens > 0) {
      const T* saved_ids = saved + n_tokens * inner_.saved_width();
      for (Index i = 0; i < n_tokens * k; ++i) {
        chosen[i] = static_cast<Index>(saved_ids[i]);
        dkept[i] = ids[i] >= 0 ? dweights[i] : T(0);
      }
    }
    inner_.route_backward(x, chosen, weights, saved, dkept, dx, arena);
  }

 private:
  CapacityOptions options_;
};

}  // namespace moe::routers
