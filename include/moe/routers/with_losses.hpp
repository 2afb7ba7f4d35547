#pragma once
/// @file routers/with_losses.hpp
/// @brief WithLosses<R, Losses...>: a router with auxiliary losses (load balancing, z-loss). The losses'
/// values come back from every forward (ForwardResult::aux_loss) and their gradients flow in the layer's
/// backward, so they cannot be forgotten (PAPERS.md C.2).
///
/// The losses read the router's raw logits z (computed once, and routed on), its routing probabilities p and the
/// columns each slot chose;
/// their gradient w.r.t. z is fixed at forward time (slot fractions are constants) and saved, and backward adds
/// it through the gate: the value the forward returns is exactly the loss whose gradient backward applies.

#include <array>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../losses/balance_batch.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "../routing_plan.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// A loss policy: see losses/balance_batch.hpp.
template <class L, class T>
concept LossPolicy = requires(const L& l, const losses::BalanceBatch<T>& b, T* g, Arena& arena) {
  { l.forward(b, g, g, arena) } -> std::convertible_to<double>;
};

/// Router R with the loss policies Losses (e.g. losses::SwitchLoss, losses::ZLoss), in that order.
/// Wrap a capacity limit around it (CapacityLimited<WithLosses<R, ...>>) so the losses see the choice
/// before dropping, as Megatron computes them.
template <class R, class... Losses>
class WithLosses : public RouterWrapper<R> {
  static_assert(BalanceRouter<R>, "moe::routers::WithLosses<R, ...>: R must model moe::BalanceRouter "
                                  "(TopKRouter, NullExpertRouter)");
  static_assert(sizeof...(Losses) >= 1 && sizeof...(Losses) <= std::size_t(k_max_losses),
                "moe::routers::WithLosses<R, Losses...>: give 1 to k_max_losses loss policies");
  static_assert((LossPolicy<Losses, typename R::Scalar> && ...),
                "moe::routers::WithLosses<R, Losses...>: every loss needs forward(BalanceBatch, dp, dz, arena); "
                "see include/moe/losses/balance_batch.hpp");
  using Base = RouterWrapper<R>;
  using Base::inner_;

 public:
  using Base::d_model;
  using Base::n_experts;
  using Base::top_k;
  using typename Base::Scalar;
  using T = Scalar;

  /// @param router the inner router; @param losses the loss policies (their coefficients inside; each with a
  ///               validate() is validated here, so a bad coefficient throws moe::Error before any forward)
  explicit WithLosses(R router, Losses... losses) : Base(std::move(router)), losses_(std::move(losses)...) {
    std::apply(
        [](const auto&... loss) {
          const auto check = [](const auto& l) {
            if constexpr (requires { l.validate(); }) l.validate();
          };
          (check(loss), ...);
        },
        losses_);
  }

  /// The inner router's saved block, then dL_aux/dz (n_tokens, balance width) for backward.
  Index saved_width() const { return inner_.saved_width() + inner_.balance_width(); }

  /// The I-th loss policy (e.g. to reset() a GlobalBatchLoss).
  template <std::size_t I>
  auto& loss() {
    return std::get<I>(losses_);
  }
  template <std::size_t I>
  const auto& loss() const {
    return std::get<I>(losses_);
  }

  /// Which experts are zero-computation (MoE++ τ weighting); MoELayer calls it with its banks' mask. Columns
  /// past the mask (AdaMoE's null experts) are ordinary.
  void set_zero_computation_mask(const std::vector<bool>& mask) {
    zero_computation_.assign(static_cast<std::size_t>(inner_.balance_width()), 0);
    for (std::size_t c = 0; c < mask.size() && c < zero_computation_.size(); ++c) zero_computation_[c] = mask[c];
  }

  /// Routes with the inner router; the losses' values are dropped (use the RouteStats overload or the layer).
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena) const {
    RouteStats stats;
    route(x, ids, weights, saved, arena, stats);
  }

  /// Routes with the inner router and evaluates every loss: stats.losses[i] is loss i's value.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena, RouteStats& stats) const {
    const Index n_tokens = x.rows(), W = inner_.balance_width(), k = top_k();
    T* z = arena.take<T>(n_tokens * W);   // (n_tokens, W) logits
    T* s = arena.take<T>(n_tokens * W);   // (n_tokens, W) scores
    T* p = arena.take<T>(n_tokens * W);   // (n_tokens, W) probabilities
    T* dp = arena.take<T>(n_tokens * W);  // (n_tokens, W) dL/dp
    Index* cols = arena.take<Index>(n_tokens * k);
    const bool run = !arena.measuring() && n_tokens > 0;
    const auto zview = run ? MatrixView<T>(z, n_tokens, W) : MatrixView<T>::shape_only(n_tokens, W);
    const std::size_t inner = arena.used();
    // The gate runs once: the losses and the choice read the same logits.
    inner_.balance_logits(x, zview, arena);
    arena.rewind(inner);
    inner_.route_logits(zview, ids, weights, saved, arena);
    arena.rewind(inner);
    T* dz = run ? saved + n_tokens * inner_.saved_width() : nullptr;  // (n_tokens, W), kept for backward
    if (run) {
      for (Index t = 0; t < n_tokens; ++t) inner_.balance_probabilities(z + t * W, s + t * W, p + t * W);
      inner_.balance_choice(saved, ids, n_tokens, cols);
      std::fill_n(dp, n_tokens * W, T(0));
      std::fill_n(dz, n_tokens * W, T(0));
    }
    const losses::BalanceBatch<T> batch{n_tokens,         W,     k, z, p, cols,
                                        zero_computation_.empty() ? nullptr : zero_computation_.data(),
                                        stats.training, stats.sequence_of_token};
    stats.n_losses = 0;
    std::apply(
        [&](const auto&... loss) {
          ((stats.losses[static_cast<std::size_t>(stats.n_losses++)] = loss.forward(batch, dp, dz, arena),
            arena.rewind(inner)),
           ...);
        },
        losses_);
    if (run)
      for (Index t = 0; t < n_tokens; ++t)
        inner_.balance_probabilities_backward(s + t * W, p + t * W, dp + t * W, dz + t * W);
  }

  /// Backward of the inner router, plus the losses' gradient saved by the forward.
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* weights, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena) {
    const Index n_tokens = x.rows(), W = inner_.balance_width();
    const std::size_t mark = arena.used();
    inner_.route_backward(x, ids, weights, saved, dweights, dx, arena);
    arena.rewind(mark);
    const bool run = !arena.measuring() && n_tokens > 0;
    const auto dz = run ? ConstMatrixView<T>(saved + n_tokens * inner_.saved_width(), n_tokens, W)
                        : ConstMatrixView<T>::shape_only(n_tokens, W);
    inner_.balance_logits_backward(x, dz, dx, arena);
  }

 private:
  std::tuple<Losses...> losses_;
  std::vector<std::uint8_t> zero_computation_;  // (W) 1 for zero-computation columns, or empty
};

}  // namespace moe::routers
