#pragma once
/// @file routers/sequence_level.hpp
/// @brief Sequence-level routing (Hecto, arXiv 2506.22919): every token of a sequence goes to the experts
/// chosen for the sequence's mean token. With recurrent experts (experts::GRU) and the layer's
/// sequence_starts, each sequence then runs as one chain through its expert.
///
/// The layer passes each token's sequence (MoELayer::forward's sequence_starts); without sequences every
/// token is its own sequence and this is the inner router.

#include <algorithm>

#include "../config.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "../concepts.hpp"
#include "../routing_plan.hpp"
#include "gating_residual.hpp"
#include "wrapper.hpp"

namespace moe::routers {

/// Routes each sequence's mean token with the inner router and gives all its tokens that choice.
/// @tparam R a token router (moe::Router; TrainableRouter for training)
template <class R>
class SequenceLevel : public RouterWrapper<R> {
  static_assert(Router<R>, "moe::routers::SequenceLevel<R>: R must model moe::Router (a token router, e.g. TopKRouter)");
  static_assert(!contains_gating_residual<R>,
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

  Index saved_width() const { return inner_.saved_width(); }  ///< per sequence (rows of the first sequences)

  /// Without sequences: every token is its own sequence.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena) const {
    inner_.route(x, ids, weights, saved, arena);
  }

  /// Routes the mean token of each of the n_sequences sequences (sequence_of_token: (n_tokens), values in
  /// [0, n_sequences)) and copies its ids and weights to every token of the sequence. saved's first
  /// n_sequences rows hold the inner router's record for the means. `stats` (optional): a reporting inner
  /// router (routers::WithLosses) learns stats->training and returns its loss values there, computed over the
  /// means, each mean its own sequence.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena, const Index* sequence_of_token,
             Index n_sequences, RouteStats* stats = nullptr) const {
    const Index n_tokens = x.rows(), k = top_k();
    Scratch s = take(arena, n_tokens);
    if (arena.measuring()) {
      inner_.route(ConstMatrixView<T>::shape_only(n_tokens, d_model()), nullptr, nullptr, nullptr, arena);
      return;
    }
    if (n_tokens == 0) return;
    pool(x, sequence_of_token, n_sequences, s);
    inner_route(ConstMatrixView<T>(s.pooled, n_sequences, d_model()), s.ids, s.weights, saved, arena, stats);
    for (Index t = 0; t < n_tokens; ++t) {
      std::copy_n(s.ids + sequence_of_token[t] * k, k, ids + t * k);
      std::copy_n(s.weights + sequence_of_token[t] * k, k, weights + t * k);
    }
  }

  /// Without sequences: the inner router's backward.
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* weights, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena) {
    inner_.route_backward(x, ids, weights, saved, dweights, dx, arena);
  }

  /// Backward of the sequence route(): a sequence's weight gradient is the sum over its tokens; the mean's
  /// input gradient is shared equally by the tokens (ADDED to dx).
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* weights, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena, const Index* sequence_of_token, Index n_sequences) {
    const Index n_tokens = x.rows(), k = top_k(), d = d_model();
    Scratch s = take(arena, n_tokens);
    T* dpooled = arena.take<T>(n_tokens * d);   // (n_sequences, d_model)
    T* dseq = arena.take<T>(n_tokens * k);      // (n_sequences, top_k)
    if (arena.measuring()) {
      inner_.route_backward(ConstMatrixView<T>::shape_only(n_tokens, d), nullptr, nullptr, nullptr, nullptr,
                            MatrixView<T>::shape_only(n_tokens, d), arena);
      return;
    }
    if (n_tokens == 0) return;
    pool(x, sequence_of_token, n_sequences, s);
    std::fill_n(dseq, n_sequences * k, T(0));
    std::fill_n(dpooled, n_sequences * d, T(0));
    for (Index t = 0; t < n_tokens; ++t) {
      const Index q = sequence_of_token[t];
      std::copy_n(ids + t * k, k, s.ids + q * k);  // every token of a sequence holds the same choice
      std::copy_n(weights + t * k, k, s.weights + q * k);
      for (Index j = 0; j < k; ++j) dseq[q * k + j] += dweights[t * k + j];
    }
    inner_.route_backward(ConstMatrixView<T>(s.pooled, n_sequences, d), s.ids, s.weights, saved, dseq,
                          MatrixView<T>(dpooled, n_sequences, d), arena);
    for (Index t = 0; t < n_tokens; ++t) {
      const Index q = sequence_of_token[t];
      const T share = T(1) / s.count[q];
      for (Index j = 0; j < d; ++j) dx(t, j) += share * dpooled[q * d + j];
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
  // The inner router on the means; one that reports (loss policies) fills stats' losses. Dropped slots are
  // not passed on: they would count sequences, not the layer's token slots.
  void inner_route(ConstMatrixView<T> pooled, Index* ids, T* weights, T* saved, Arena& arena, RouteStats* stats) const {
    if constexpr (requires(RouteStats& st) { inner_.route(pooled, ids, weights, saved, arena, st); }) {
      if (stats != nullptr) {
        RouteStats inner{.training = stats->training};
        inner_.route(pooled, ids, weights, saved, arena, inner);
        stats->losses = inner.losses;
        stats->n_losses = inner.n_losses;
        return;
      }
    }
    inner_.route(pooled, ids, weights, saved, arena);
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
