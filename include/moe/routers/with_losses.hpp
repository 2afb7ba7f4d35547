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

#include "../concepts.hpp"
#include "../config.hpp"
#include "../losses/balance_batch.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// A loss policy: see losses/balance_batch.hpp.
template <class L, class T>
concept LossPolicy = requires(const L& l, const losses::BalanceBatch<T>& b, T* g, Arena& arena) {
  { l.forward(b, g, g, arena) } -> std::convertible_to<double>;
  l.validate();
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
                "moe::routers::WithLosses<R, Losses...>: every loss needs forward(BalanceBatch, dp, dz, arena) and "
                "validate(); see include/moe/losses/balance_batch.hpp");
  using Base = RouterWrapper<R>;
  using Base::inner_;

 public:
  using Base::d_model;
  using Base::n_experts;
  using Base::top_k;
  using typename Base::Scalar;
  using T = Scalar;

  /// @param router the inner router; @param losses the loss policies (their coefficients inside; each is
  ///               validated here, so a bad coefficient throws moe::Error before any forward)
  explicit WithLosses(R router, Losses... losses) : Base(std::move(router)), losses_(std::move(losses)...) {
    std::apply([](const auto&... loss) { (loss.validate(), ...); }, losses_);
  }

  /// The inner router's saved block, then dL_aux/dz for backward.
  struct Saved {
    typename R::Saved inner{};
    T* dz = nullptr;  ///< (n_tokens, balance width) the losses' gradient w.r.t. the logits
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const {
    Saved s;
    s.inner = inner_.carve_saved(arena, n_tokens);
    s.dz = arena.take<T>(n_tokens * inner_.balance_width());
    return s;
  }

  /// The I-th loss policy (e.g. to change a coefficient).
  template <std::size_t I>
  auto& loss() {
    return std::get<I>(losses_);
  }
  template <std::size_t I>
  const auto& loss() const {
    return std::get<I>(losses_);
  }

  /// Routes with the inner router and evaluates every loss: out.losses[i] is loss i's value. The losses read
  /// in.training (stateful losses advance only then), in.sequence_of_token (sequence-wise losses) and
  /// in.zero_computation (MoE++ τ weighting).
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = in.n_tokens(), W = inner_.balance_width(), k = top_k();
    T* z = arena.take<T>(n_tokens * W);   // (n_tokens, W) logits
    T* s = arena.take<T>(n_tokens * W);   // (n_tokens, W) scores
    T* p = arena.take<T>(n_tokens * W);   // (n_tokens, W) probabilities
    T* dp = arena.take<T>(n_tokens * W);  // (n_tokens, W) dL/dp
    Index* cols = arena.take<Index>(n_tokens * k);
    const bool run = !arena.measuring() && n_tokens > 0;
    const auto zview = run ? MatrixView<T>(z, n_tokens, W) : MatrixView<T>::shape_only(n_tokens, W);
    const std::size_t mark = arena.used();
    auto inner = out.with_saved(out.saved.inner);
    // The gate runs once: the losses and the choice read the same logits.
    inner_.balance_logits(in, zview, arena);
    arena.rewind(mark);
    inner_.route_logits(zview, inner, arena);
    arena.rewind(mark);
    T* dz = run ? out.saved.dz : nullptr;  // (n_tokens, W), kept for backward
    if (run) {
      for (Index t = 0; t < n_tokens; ++t) inner_.balance_probabilities(z + t * W, s + t * W, p + t * W);
      inner_.balance_choice(inner, n_tokens, cols);
      std::fill_n(dp, n_tokens * W, T(0));
      std::fill_n(dz, n_tokens * W, T(0));
    }
    const losses::BalanceBatch<T> batch{
        n_tokens,       W, k, z, p, cols, in.zero_computation, in.training, in.sequence_of_token, in.global_batch,
        W - n_experts()};  // columns past the experts are null experts
    out.n_losses = 0;
    std::apply(
        [&](const auto&... loss) {
          ((out.losses[static_cast<std::size_t>(out.n_losses++)] = loss.forward(batch, dp, dz, arena),
            arena.rewind(mark)),
           ...);
        },
        losses_);
    if (run)
      for (Index t = 0; t < n_tokens; ++t)
        inner_.balance_probabilities_backward(s + t * W, p + t * W, dp + t * W, dz + t * W);
  }

  /// Backward of the inner router, plus the losses' gradient saved by the forward.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens(), W = inner_.balance_width();
    const std::size_t mark = arena.used();
    inner_.route_backward(in, out.with_saved(out.saved.inner), grad, arena);
    arena.rewind(mark);
    const bool run = !arena.measuring() && n_tokens > 0;
    const auto dz = run ? ConstMatrixView<T>(out.saved.dz, n_tokens, W) : ConstMatrixView<T>::shape_only(n_tokens, W);
    inner_.balance_logits_backward(in, dz, grad, arena);
  }

 private:
  std::tuple<Losses...> losses_;
};

}  // namespace moe::routers
