#pragma once
/// @file routers/wrapper.hpp
/// @brief RouterWrapper<R>: the base of every router wrapper (CapacityLimited, WithLosses, GatingResidual,
/// SequenceLevel). It holds the wrapped router, gives it as inner(), and forwards what a wrapper does not
/// change: the shape, init and the parameters. A wrapper that adds parameters (GatingResidual) redefines
/// init and visit_parameters.

#include <utility>

#include "../config.hpp"
#include "../random.hpp"

namespace moe::routers {

template <class R>
class RouterWrapper {
 public:
  using Scalar = typename R::Scalar;

  explicit RouterWrapper(R inner) : inner_(std::move(inner)) {}

  Index d_model() const { return inner_.d_model(); }      ///< token width
  Index n_experts() const { return inner_.n_experts(); }  ///< experts routed over
  Index top_k() const { return inner_.top_k(); }          ///< slots per token
  const R& inner() const { return inner_; }               ///< the wrapped router
  R& inner() { return inner_; }                           ///< the wrapped router

  void init(Rng& rng) { inner_.init(rng); }  ///< the wrapped router's init
  /// The wrapped router's parameters.
  template <class F>
  void visit_parameters(F&& f) {
    inner_.visit_parameters(std::forward<F>(f));
  }

 protected:
  R inner_;
};

}  // namespace moe::routers
