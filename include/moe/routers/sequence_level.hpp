#pragma once
/// @file routers/sequence_level.hpp
/// @brief Sequence-level routing (Hecto, arXiv 2506.22919): every token of a sequence goes to the experts
/// chosen for the sequence's mean token. With recurrent experts (experts::GRU) and the layer's
/// sequence_starts, each sequence then runs as one chain through its expert.
///
/// The layer passes each token's sequence (RouteInput::sequence_of_token, from MoELayer::forward's
/// sequence_starts); without sequences every token is its own sequence and this is the inner router.

#include <algorithm>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// Routes each sequence's mean token with the inner router and gives all its tokens that choice.
/// @tparam R a token router (moe::Router; TrainableRouter for training)
template <class R>
class SequenceLevel : public RouterWrapper<R> {
  static_assert(Router<R>, "moe::routers::SequenceLevel<R>: R must model moe::Router (a token router, e.g. TopKRouter)");
  static_assert(!links_logits<R>,
                "moe::routers::SequenceLevel<R>: R must not contain a GatingResidual: the residual adds the previous "
                "layer's per-token logits, and a sequence-level router routes one pooled row per sequence");
  using Base = RouterWrapper<R>;
  using Base::inner_;

 public:
  using Base::d_model;
  using Base::n_experts;
  using Base::top_k;
  using typename Base::Scalar;
  using T = Scalar;

  explicit SequenceLevel(R inner) : Base(std::move(inner)) {}

  using typename Base::Saved;  ///< the inner router's, for the means (rows of the first n_sequences)

  /// Routes the mean token of each of the in.n_sequences sequences and copies its ids and weights to every
  /// token of the sequence; without sequences (in.sequence_of_token == nullptr) every token is its own
  /// sequence: the inner router. The inner router sees the means as a batch without sequences, and its loss
  /// values (routers::WithLosses) come back in out.losses, computed over the means. Dropped slots are not
  /// passed on: they would count sequences, not the layer's token slots.
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    if (in.sequence_of_token == nullptr && !arena.measuring()) {
      inner_.route(in, out, arena);
      return;
    }
    const Index n_tokens = in.n_tokens(), k = top_k();
    Scratch s = take(arena, n_tokens);
    if (arena.measuring()) {  // the sequence path, which takes more than the inner router alone
      RouteOutput<T, Saved> inner = out;
      inner_.route(pooled_input(in, ConstMatrixView<T>::shape_only(n_tokens, d_model())), inner, arena);
      return;
    }
    if (n_tokens == 0) return;
    pool(in.x, in.sequence_of_token, in.n_sequences, s);
    RouteOutput<T, Saved> inner = out.with_saved(out.saved);
    inner.ids = s.ids;
    inner.weights = s.weights;
    inner.logits = {};
    inner_.route(pooled_input(in, ConstMatrixView<T>(s.pooled, in.n_sequences, d_model())), inner, arena);
    out.losses = inner.losses;
    out.n_losses = inner.n_losses;
    for (Index t = 0; t < n_tokens; ++t) {
      std::copy_n(s.ids + in.sequence_of_token[t] * k, k, out.ids + t * k);
      std::copy_n(s.weights + in.sequence_of_token[t] * k, k, out.weights + t * k);
    }
  }

  /// Backward of route(): a sequence's weight gradient is the sum over its tokens; the mean's input gradient
  /// is shared equally by the tokens (ADDED to grad.dx).
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    if (in.sequence_of_token == nullptr && !arena.measuring()) {
      inner_.route_backward(in, out, grad, arena);
      return;
    }
    const Index n_tokens = in.n_tokens(), k = top_k(), d = d_model(), n_sequences = in.n_sequences;
    Scratch s = take(arena, n_tokens);
    T* dpooled = arena.take<T>(n_tokens * d);   // (n_sequences, d_model)
    T* dseq = arena.take<T>(n_tokens * k);      // (n_sequences, top_k)
    if (arena.measuring()) {
      inner_.route_backward(pooled_input(in, ConstMatrixView<T>::shape_only(n_tokens, d)), out,
                            {.dx = MatrixView<T>::shape_only(n_tokens, d)}, arena);
      return;
    }
    if (n_tokens == 0) return;
    pool(in.x, in.sequence_of_token, n_sequences, s);
    std::fill_n(dseq, n_sequences * k, T(0));
    std::fill_n(dpooled, n_sequences * d, T(0));
    for (Index t = 0; t < n_tokens; ++t) {
      const Index q = in.sequence_of_token[t];
      std::copy_n(out.ids + t * k, k, s.ids + q * k);  // every token of a sequence holds the same choice
      std::copy_n(out.weights + t * k, k, s.weights + q * k);
      for (Index j = 0; j < k; ++j) dseq[q * k + j] += grad.dweights[t * k + j];
    }
    RouteOutput<T, Saved> inner = out.with_saved(out.saved);
    inner.ids = s.ids;
    inner.weights = s.weights;
    inner_.route_backward(pooled_input(in, ConstMatrixView<T>(s.pooled, n_sequences, d)), inner,
                          {.dweights = dseq, .dx = MatrixView<T>(dpooled, n_sequences, d)}, arena);
    for (Index t = 0; t < n_tokens; ++t) {
      const Index q = in.sequence_of_token[t];
      const T share = T(1) / s.count[q];
      for (Index j = 0; j < d; ++j) grad.dx(t, j) += share * dpooled[q * d + j];
    }
  }

 private:
  struct Scratch {
    T* pooled;     // (n_sequences, d_model) mean token of each sequence
    T* count;      // (n_sequences) tokens per sequence
    Index* ids;    // (n_sequences, top_k)
    T* weights;    // (n_sequences, top_k)
  };
  // Sized for n_sequences <= n_tokens.
  Scratch take(Arena& arena, Index n_tokens) const {
    return {arena.take<T>(n_tokens * d_model()), arena.take<T>(n_tokens), arena.take<Index>(n_tokens * top_k()),
            arena.take<T>(n_tokens * top_k())};
  }
  // What the inner router reads: the means, as a batch without sequences, of the same forward.
  static RouteInput<T> pooled_input(const RouteInput<T>& in, ConstMatrixView<T> pooled) {
    return {
        .x = pooled, .training = in.training, .zero_computation = in.zero_computation, .global_batch = in.global_batch};
  }

  void pool(ConstMatrixView<T> x, const Index* sequence_of_token, Index n_sequences, const Scratch& s) const {
    const Index d = d_model();
    std::fill_n(s.pooled, n_sequences * d, T(0));
    std::fill_n(s.count, n_sequences, T(0));
    for (Index t = 0; t < x.rows(); ++t) {
      const Index q = sequence_of_token[t];
      s.count[q] += T(1);
      for (Index j = 0; j < d; ++j) s.pooled[q * d + j] += x(t, j);
    }
    for (Index q = 0; q < n_sequences; ++q)
      for (Index j = 0; j < d; ++j) s.pooled[q * d + j] /= s.count[q];
  }

};

}  // namespace moe::routers
