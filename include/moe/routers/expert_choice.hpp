#pragma once
/// @file routers/expert_choice.hpp
/// @brief ExpertChoiceRouter: each expert chooses its top-c tokens (Zhou et al., arXiv 2202.09368; PAPERS.md
/// A.8; flaxformer `ExpertsChooseMaskedRouter`).
///
/// S = softmax(x W_gᵀ) per token (n_tokens, n_experts); expert e takes the c = min(T, ceil(T · capacity_factor
/// / E)) tokens with the largest S[:, e] (ties: lower token) and weights each by S[t, e]. Perfect balance by
/// construction; a token gets between 0 and E experts. Slots are one per expert: slot e of token t holds id e
/// if expert e took t, else -1 (weight 0), so top_k() = n_experts.
///
/// NOT CAUSAL: a token's experts depend on the other tokens of the batch, so autoregressive decoding (one
/// token at a time, or a batch that grows) routes differently from a full-sequence pass. Use it for
/// encoders or whole-batch training, not for token-by-token generation.

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

#include "../config.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/softmax.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
#include "../random.hpp"
#include "../route_io.hpp"
#include "../workspace.hpp"
#include "linear_gate.hpp"
#include "scores.hpp"
#include "token_chunks.hpp"

namespace moe::routers {

/// Knobs of ExpertChoiceRouter.
struct ExpertChoiceOptions {
  double capacity_factor = 2.0;  ///< c = min(T, ceil(T · capacity_factor / E)) tokens per expert (paper default 2);
                                 ///< finite, > 0 (huge: every expert takes every token)
};

/// Expert-choice router (non-causal, see the file comment).
/// @tparam T    scalar type
/// @tparam Arch instruction set of the kernels
template <class T, class Arch = kernels::default_arch>
class ExpertChoiceRouter {
 public:
  using Scalar = T;

  /// @param shape d_model and n_experts (shape.top_k is not used: every expert has a slot)
  /// @param options the capacity factor (throws moe::Error naming a bad field)
  ExpertChoiceRouter(const MoEConfig& shape, const ExpertChoiceOptions& options = {})
      : d_model_(shape.validated().d_model),
        n_experts_(shape.n_experts),
        options_(validated(shape, options)),
        gate_(d_model_, {{"gate", n_experts_}}) {}

  Index d_model() const { return d_model_; }        ///< token width
  Index n_experts() const { return n_experts_; }    ///< experts
  Index top_k() const { return n_experts_; }        ///< slots per token: one per expert
  /// What backward reads: the scores.
  struct Saved {
    T* scores = nullptr;  ///< (n_tokens, n_experts) S = softmax(z)
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const { return {arena.take<T>(n_tokens * n_experts_)}; }
  const ExpertChoiceOptions& options() const { return options_; }  ///< the knobs
  /// Tokens each expert takes in a batch of n_tokens: min(n_tokens, ceil(n_tokens · capacity_factor / E)),
  /// bounded in double before the conversion (any valid factor gives an Index).
  Index capacity(Index n_tokens) const {
    const double c = std::ceil(static_cast<double>(n_tokens) * options_.capacity_factor / static_cast<double>(n_experts_));
    return static_cast<Index>(std::min(c, static_cast<double>(n_tokens)));
  }

  /// The gate weight W_g, (n_experts, d_model).
  MatrixView<T> gate() { return gate_.block(0).value(); }
  ConstMatrixView<T> gate() const { return gate_.block(0).value(); }
  /// Fills W_g from U(-1/sqrt(d_model), 1/sqrt(d_model)).
  void init(Rng& rng) { gate_.init(rng); }
  /// f(name, Parameter&) for W_g ("gate").
  template <class F>
  void visit_parameters(F&& f) {
    gate_.visit(f);
  }  /// No state besides the parameters.
  template <class F>
  void visit_state(F&&) {}

  /// Routes in.x (n_tokens, d_model): ids (n_tokens, n_experts) with ids[t, e] = e or -1, weights S[t, e] or 0.
  /// A token without a finite logit ranks below every other token.
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    Index* ids = out.ids;
    T* weights = out.weights;
    T* saved = out.saved.scores;
    const Index n_tokens = x.rows(), E = n_experts_, c = capacity(n_tokens);
    T* columns = arena.take<T>(E * n_tokens);  // (n_experts, n_tokens) S transposed: each expert's keys
    Index* chosen = arena.take<Index>(E * c);  // (n_experts, c) tokens each expert takes
    if (arena.measuring() || n_tokens == 0) return;
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index, Index t0, Index t1) {
      gate_.logits(x.middle_rows(t0, t1 - t0), MatrixView<T>(saved + t0 * E, t1 - t0, E));
      for (Index t = t0; t < t1; ++t) {
        T* s = saved + t * E;
        kernels::softmax_row(Arch{}, s, s, E);
        // A softmax row has a positive entry unless no logit was finite: such a row's keys are NaN.
        const bool finite = std::any_of(s, s + E, [](T v) { return v > T(0); });
        for (Index e = 0; e < E; ++e) columns[e * n_tokens + t] = finite ? s[e] : std::numeric_limits<T>::quiet_NaN();
        std::fill_n(ids + t * E, E, Index{-1});
        std::fill_n(weights + t * E, E, T(0));
      }
    });
    // Expert e writes only slot e of its tokens: no two experts touch the same slot.
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < E; ++e) {
      Index* mine = chosen + e * c;
      kernels::top_k(Arch{}, columns + e * n_tokens, n_tokens, c, mine);
      for (Index i = 0; i < c; ++i) {
        ids[mine[i] * E + e] = e;
        weights[mine[i] * E + e] = saved[mine[i] * E + e];
      }
    }
  }

  /// Backward of route(): dL/dw[t, e] = dL/dS[t, e] on taken slots, through the softmax; adds dL/dx to grad.dx
  /// and accumulates dL/dW_g. The choice is piecewise constant: no gradient.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens(), E = n_experts_;
    T* dlogits = arena.take<T>(n_tokens * E);  // (n_tokens, n_experts)
    if (arena.measuring() || n_tokens == 0) return;
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      T* dz = dlogits + t * E;
      detail::scatter_slots(out.ids + t * E, grad.dweights + t * E, E, dz, E);
      detail::score_backward(ScoreFunction::softmax, out.saved.scores + t * E, dz, E);
    }
    gate_.backward(in.x, ConstMatrixView<T>(dlogits, n_tokens, E), grad.dx);
  }

 private:
  static const ExpertChoiceOptions& validated(const MoEConfig& shape, const ExpertChoiceOptions& o) {
    constexpr const char* who = "moe::routers::ExpertChoiceRouter";
    moe::detail::require_in(o.capacity_factor, moe::detail::k_positive, who, "options.capacity_factor");
    moe::detail::checked_size<T>(who, "n_experts * d_model", {shape.n_experts, shape.d_model});
    return o;
  }

  Index d_model_;
  Index n_experts_;
  ExpertChoiceOptions options_;
  detail::LinearGate<T, Arch> gate_;  // W_g (n_experts, d_model)
};

}  // namespace moe::routers
