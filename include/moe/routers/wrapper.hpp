#pragma once
/// @file routers/wrapper.hpp
/// @brief RouterWrapper<R>: the base of every router wrapper (CapacityLimited, WithLosses, GatingResidual,
/// SequenceLevel). It holds the wrapped router, gives it as inner(), and forwards what a wrapper does not
/// change: the shape, init, the parameters and the saved block. A wrapper that adds parameters
/// (GatingResidual) redefines init and visit_parameters; one that saves more (CapacityLimited, WithLosses)
/// redefines Saved and carve_saved, composing the inner router's.

#include <utility>

#include "../config.hpp"
#include "../random.hpp"
#include "../workspace.hpp"

namespace moe::routers {

template <class R>
class RouterWrapper {
 public:
  using Scalar = typename R::Scalar;
  using Inner = R;                              ///< the wrapped router's type (moe::links_logits reads it)
  using Saved = typename R::Saved;              ///< the wrapped router's saved block
  static constexpr bool passes_logits = false;  ///< whether this wrapper itself passes logits between layers

  explicit RouterWrapper(R inner) : inner_(std::move(inner)) {}

  Index d_model() const { return inner_.d_model(); }      ///< token width
  Index n_experts() const { return inner_.n_experts(); }  ///< experts routed over
  Index top_k() const { return inner_.top_k(); }          ///< slots per token
  const R& inner() const { return inner_; }               ///< the wrapped router
  R& inner() { return inner_; }                           ///< the wrapped router

  void init(Rng& rng) { inner_.init(rng); }  ///< the wrapped router's init
  /// The wrapped router's saved block.
  Saved carve_saved(Arena& arena, Index n_tokens) const { return inner_.carve_saved(arena, n_tokens); }
  /// The wrapped router's parameters.
  template <class F>
  void visit_parameters(F&& f) {
    inner_.visit_parameters(std::forward<F>(f));
  }
  /// The wrapped router's state.
  template <class F>
  void visit_state(F&& f) {
    inner_.visit_state(std::forward<F>(f));
  }

 protected:
  R inner_;
};

}  // namespace moe::routers
