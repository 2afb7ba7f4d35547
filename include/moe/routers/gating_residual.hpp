#pragma once
/// @file routers/gating_residual.hpp
/// @brief GatingResidual<R>: MoE++'s gating residuals (PAPERS.md A.2). The router of layer j adds
/// W^j · G^{j-1}(x), the previous layer's raw logits mapped by a bias-free (E, E) "gate_map", to its own
/// logits: G^j(x) = W_g^j x + W^j G^{j-1}(x). The previous logits come in RouteInput::previous_logits and
/// this layer's go out in RouteOutput::logits (moe::Stack passes them from layer to layer, and their
/// gradients back through RouteGradient); a layer given none (the first) routes on W_g x alone.

#include <algorithm>
#include <utility>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../kernels/simd/matmul_nn.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// Router R (TopKRouter: it routes from given logits, route_logits/logits_backward) with a gating residual.
/// Models moe::BalanceRouter, so loss policies wrap it: WithLosses<GatingResidual<R>, ...>.
template <class R>
class GatingResidual : public RouterWrapper<R> {
  static_assert(LogitsRouter<R>, "moe::routers::GatingResidual<R>: R must model moe::LogitsRouter (route from given "
                                 "logits and back: TopKRouter)");
  using Base = RouterWrapper<R>;
  using Base::inner_;

 public:
  using Base::d_model;
  using Base::n_experts;
  using Base::top_k;
  using typename Base::Scalar;
  using T = Scalar;

  /// @param router the inner router; the map is (n_experts, n_experts), zero until init() (moe::Error when
  ///               n_experts * n_experts elements exceed PTRDIFF_MAX bytes)
  explicit GatingResidual(R router)
      : Base(std::move(router)), map_(map_rows(inner_), inner_.n_experts()) {}

  static constexpr bool passes_logits = true;  ///< reads RouteInput::previous_logits, writes RouteOutput::logits
  using typename Base::Saved;                  ///< the inner router's

  /// W^j (n_experts, n_experts): logits += previous · W^jᵀ (nn.Linear layout, MoE++ `gate_map`).
  MatrixView<T> gate_map() { return map_.value(); }
  ConstMatrixView<T> gate_map() const { return map_.value(); }

  /// Inner router from its init, the map from U(-1/sqrt(E), 1/sqrt(E)) (nn.Linear's default, as MoE++).
  void init(Rng& rng) {
    inner_.init(rng);
    map_.init_uniform(rng, n_experts());
  }
  /// The inner router's parameters, then "gate_map".
  template <class F>
  void visit_parameters(F&& f) {
    inner_.visit_parameters(f);
    f(std::string_view("gate_map"), map_);
  }

  /// z = W_g x (+ in.previous_logits · W^jᵀ), written to out.logits (when given), then route_logits(z).
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = in.n_tokens(), E = n_experts();
    T* z = arena.take<T>(n_tokens * E);  // (n_tokens, n_experts)
    const auto zview = arena.measuring() ? MatrixView<T>::shape_only(n_tokens, E) : MatrixView<T>(z, n_tokens, E);
    balance_logits(in, zview, arena);
    route_logits(zview, out, arena);
  }

  /// The residual logits z (from balance_logits) written to out.logits (when given), then the inner router's choice.
  void route_logits(ConstMatrixView<T> z, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = z.rows(), E = n_experts();
    if (!arena.measuring() && out.logits.data() != nullptr) {
      moe::detail::require(out.logits.rows() == n_tokens && out.logits.cols() == E,
                           "moe::routers::GatingResidual: the logits output is (", out.logits.rows(), ", ",
                           out.logits.cols(), "), expected (", n_tokens, ", ", E, ")");
      for (Index t = 0; t < n_tokens; ++t) std::copy_n(z.row(t), E, out.logits.row(t));
    }
    inner_.route_logits(z, out, arena);
  }

  /// Backward: dz = (from the weights) + grad.dlogits of the next layer, then through gate and map.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens(), E = n_experts();
    T* dz = arena.take<T>(n_tokens * E);  // (n_tokens, n_experts)
    const auto dzview = arena.measuring() ? MatrixView<T>::shape_only(n_tokens, E) : MatrixView<T>(dz, n_tokens, E);
    inner_.logits_backward(out, grad.dweights, dzview, arena);
    if (!arena.measuring() && grad.dlogits.data() != nullptr)
      for (Index t = 0; t < n_tokens; ++t)
        for (Index e = 0; e < E; ++e) dzview(t, e) += grad.dlogits(t, e);
    balance_logits_backward(in, dzview, grad, arena);
  }

  /// @name Balance protocol (moe::BalanceRouter): the inner router's, on the residual logits.
  /// @{
  Index balance_width() const { return inner_.balance_width(); }
  void balance_logits(const RouteInput<T>& in, MatrixView<T> z, Arena& arena) const {
    const Index n_tokens = in.n_tokens(), E = n_experts();
    const ConstMatrixView<T> previous = in.previous_logits;
    const bool residual = previous.data() != nullptr;
    // (n_tokens, n_experts) previous · W^jᵀ; a measuring pass sizes it whether or not logits will come.
    T* mapped = residual || arena.measuring() ? arena.take<T>(n_tokens * E) : nullptr;
    const std::size_t mark = arena.used();
    inner_.balance_logits(in, z, arena);
    arena.rewind(mark);
    if (arena.measuring() || !residual || n_tokens == 0) return;
    moe::detail::require(previous.rows() == n_tokens && previous.cols() == E,
                         "moe::routers::GatingResidual: the previous logits are (", previous.rows(), ", ",
                         previous.cols(), "), expected (", n_tokens, ", ", E, ")");
    kernels::matmul_nt(kernels::default_arch{}, previous, map_.value(), MatrixView<T>(mapped, n_tokens, E));
    for (Index t = 0; t < n_tokens; ++t)
      for (Index e = 0; e < E; ++e) z(t, e) += mapped[t * E + e];
  }
  void balance_probabilities(const T* z, T* s, T* p) const { inner_.balance_probabilities(z, s, p); }
  void balance_probabilities_backward(const T* s, const T* p, T* g, T* dz) const {
    inner_.balance_probabilities_backward(s, p, g, dz);
  }
  void balance_choice(const RouteOutput<T, Saved>& out, Index n_tokens, Index* cols) const {
    inner_.balance_choice(out, n_tokens, cols);
  }
  /// dW^j += dzᵀ previous, grad.dprevious_logits += dz W^j, then the inner gate's backward.
  void balance_logits_backward(const RouteInput<T>& in, ConstMatrixView<T> dz, const RouteGradient<T>& grad,
                               Arena& arena) {
    if (!arena.measuring() && in.n_tokens() > 0 && in.previous_logits.data() != nullptr) {
      kernels::parallel_add_matmul_tn<T>(kernels::default_arch{}, dz, in.previous_logits, map_.grad());
      if (grad.dprevious_logits.data() != nullptr)
        kernels::parallel_add_matmul_nn<T>(kernels::default_arch{}, dz, map_.value(), grad.dprevious_logits);
    }
    inner_.balance_logits_backward(in, dz, grad, arena);
  }
  /// @}

 private:
  // n_experts, once the map's n_experts * n_experts elements are known to fit.
  static Index map_rows(const R& router) {
    moe::detail::checked_size<T>("moe::routers::GatingResidual", "n_experts * n_experts (gate_map)",
                                 {router.n_experts(), router.n_experts()});
    return router.n_experts();
  }

  Parameter<T> map_;  // W^j (n_experts, n_experts)
};

}  // namespace moe::routers
