#pragma once
/// @file routers/gating_residual.hpp
/// @brief GatingResidual<R>: MoE++'s gating residuals (PAPERS.md A.2). The router of layer j adds
/// W^j · G^{j-1}(x), the previous layer's raw logits mapped by a bias-free (E, E) "gate_map", to its own
/// logits: G^j(x) = W_g^j x + W^j G^{j-1}(x). moe::Stack passes the logits from layer to layer (bind_*);
/// a layer with nothing bound (the first) routes on W_g x alone.

#include <algorithm>
#include <utility>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../detail/linalg.hpp"
#include "../kernels/simd/matmul.hpp"
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

  Index saved_width() const { return inner_.saved_width(); }  ///< the inner router's
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

  /// For the next forward: the previous layer's logits (n_tokens, n_experts) (empty: none, the first layer)
  /// and where this layer's logits go (empty: nowhere). The views must live until the forward returns.
  void bind_forward(ConstMatrixView<T> previous, MatrixView<T> logits) {
    previous_ = previous;
    out_ = logits;
  }
  /// For the next backward: the same previous logits, dL/d(this layer's logits) from the next layer (empty:
  /// none) and where dL/d(previous logits) goes (ADDED to; empty: dropped).
  void bind_backward(ConstMatrixView<T> previous, ConstMatrixView<T> dlogits, MatrixView<T> dprevious) {
    previous_ = previous;
    dout_ = dlogits;
    dprevious_ = dprevious;
  }

  /// z = W_g x (+ previous · W^jᵀ), then route_logits(z).
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena) const {
    const Index n_tokens = x.rows(), E = n_experts();
    T* z = arena.take<T>(n_tokens * E);  // (n_tokens, n_experts)
    const auto zview = arena.measuring() ? MatrixView<T>::shape_only(n_tokens, E) : MatrixView<T>(z, n_tokens, E);
    balance_logits(x, zview, arena);
    route_logits(zview, ids, weights, saved, arena);
  }

  /// The residual logits z (from balance_logits) written to the bound output, then the inner router's choice.
  void route_logits(ConstMatrixView<T> z, Index* ids, T* weights, T* saved, Arena& arena) const {
    const Index n_tokens = z.rows(), E = n_experts();
    if (!arena.measuring() && out_.data() != nullptr) {
      moe::detail::require(out_.rows() == n_tokens && out_.cols() == E, "moe::routers::GatingResidual: the bound logits output is (",
                           out_.rows(), ", ", out_.cols(), "), expected (", n_tokens, ", ", E, ")");
      for (Index t = 0; t < n_tokens; ++t) std::copy_n(z.row(t), E, out_.row(t));
    }
    inner_.route_logits(z, ids, weights, saved, arena);
  }

  /// Backward: dz = (from the weights) + the bound dL/dz of the next layer, then through gate and map.
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* /*weights*/, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena) {
    const Index n_tokens = x.rows(), E = n_experts();
    T* dz = arena.take<T>(n_tokens * E);  // (n_tokens, n_experts)
    const auto dzview = arena.measuring() ? MatrixView<T>::shape_only(n_tokens, E) : MatrixView<T>(dz, n_tokens, E);
    inner_.logits_backward(ids, saved, dweights, dzview, arena);
    if (!arena.measuring() && dout_.data() != nullptr)
      for (Index t = 0; t < n_tokens; ++t)
        for (Index e = 0; e < E; ++e) dzview(t, e) += dout_(t, e);
    balance_logits_backward(x, dzview, dx, arena);
  }

  /// @name Balance protocol (moe::BalanceRouter): the inner router's, on the residual logits.
  /// @{
  Index balance_width() const { return inner_.balance_width(); }
  void balance_logits(ConstMatrixView<T> x, MatrixView<T> z, Arena& arena) const {
    const Index n_tokens = x.rows(), E = n_experts();
    const bool residual = previous_.data() != nullptr;
    T* mapped = residual ? arena.take<T>(n_tokens * E) : nullptr;  // (n_tokens, n_experts) previous · W^jᵀ
    const std::size_t mark = arena.used();
    inner_.balance_logits(x, z, arena);
    arena.rewind(mark);
    if (arena.measuring() || !residual || n_tokens == 0) return;
    moe::detail::require(previous_.rows() == n_tokens && previous_.cols() == E, "moe::routers::GatingResidual: the bound previous logits are (",
                         previous_.rows(), ", ", previous_.cols(), "), expected (", n_tokens, ", ", E, ")");
    kernels::matmul_nt(kernels::default_arch{}, previous_, map_.value(), MatrixView<T>(mapped, n_tokens, E));
    for (Index t = 0; t < n_tokens; ++t)
      for (Index e = 0; e < E; ++e) z(t, e) += mapped[t * E + e];
  }
  void balance_probabilities(const T* z, T* s, T* p) const { inner_.balance_probabilities(z, s, p); }
  void balance_probabilities_backward(const T* s, const T* p, T* g, T* dz) const {
    inner_.balance_probabilities_backward(s, p, g, dz);
  }
  void balance_choice(const T* saved, const Index* ids, Index n_tokens, Index* cols) const {
    inner_.balance_choice(saved, ids, n_tokens, cols);
  }
  /// dW^j += dzᵀ previous, dprevious += dz W^j, then the inner gate's backward.
  void balance_logits_backward(ConstMatrixView<T> x, ConstMatrixView<T> dz, MatrixView<T> dx, Arena& arena) {
    if (!arena.measuring() && x.rows() > 0 && previous_.data() != nullptr) {
      moe::detail::add_matmul_tn(dz, previous_, map_.grad());
      if (dprevious_.data() != nullptr) moe::detail::add_matmul_nn(dz, ConstMatrixView<T>(map_.value()), dprevious_);
    }
    inner_.balance_logits_backward(x, dz, dx, arena);
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
  ConstMatrixView<T> previous_;
  MatrixView<T> out_;
  ConstMatrixView<T> dout_;
  MatrixView<T> dprevious_;
};

/// True when R is a GatingResidual or a wrapper (inner()) around one.
template <class R>
inline constexpr bool contains_gating_residual = [] {
  if constexpr (requires(R& r) { r.inner(); })
    return contains_gating_residual<std::remove_cvref_t<decltype(std::declval<R&>().inner())>>;
  else
    return false;
}();
template <class R>
inline constexpr bool contains_gating_residual<GatingResidual<R>> = true;

}  // namespace moe::routers
