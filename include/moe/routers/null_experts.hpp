#pragma once
/// @file routers/null_experts.hpp
/// @brief NullExpertRouter: AdaMoE's null experts (PAPERS.md A.3 and E.2). m null experts are routed
/// together with the n true experts and top_k is raised, so a token runs between 0 and top_k true experts.
///
/// Per token (official code, `CustomMixtralSparseMoeBlock`): logits over n + m experts (the null part from a
/// separate projection `null_gate`, or from extra rows of one gate), p = softmax over all n + m, top_k of p
/// (ties: lower id), then the weights of the chosen TRUE experts divided by their sum (paper Sec. 3.4,
/// option 2). A null slot produces zero at zero cost: its id is -1 and its weight 0, so the layer skips it.
/// If no true expert is chosen every slot is -1. `saved` keeps all n + m probabilities (what a null-aware
/// balance loss needs).

#include <algorithm>
#include <span>
#include <string_view>

#include "../config.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
#include "../random.hpp"
#include "../route_io.hpp"
#include "../routing_plan.hpp"
#include "../workspace.hpp"
#include "linear_gate.hpp"
#include "scores.hpp"
#include "token_chunks.hpp"

namespace moe::routers {

/// Knobs of NullExpertRouter.
struct NullExpertOptions {
  Index n_null_experts = 0;             ///< m, the null experts (AdaMoE Mixtral: 8 with top_k = 3)
  bool separate_null_projection = true;  ///< null logits from their own (m, d_model) "null_gate" (official code)
};

/// Top-k softmax router over n true and m null experts.
/// @tparam T    scalar type
/// @tparam Arch instruction set of the kernels
template <class T, class Arch = kernels::default_arch>
class NullExpertRouter {
 public:
  using Scalar = T;

  /// @param shape d_model, n_experts = n (true experts, what the banks hold) and top_k (1 <= top_k <= n + m)
  /// @param options m and the projection layout (throws moe::Error naming a bad field)
  NullExpertRouter(const MoEConfig& shape, const NullExpertOptions& options)
      : d_model_(shape.d_model),
        n_experts_(shape.n_experts),
        n_null_(validated(shape, options).n_null_experts),
        top_k_(shape.top_k),
        separate_(options.separate_null_projection && options.n_null_experts > 0),
        gate_(options.separate_null_projection
                  ? detail::LinearGate<T, Arch>(shape.d_model, {{"gate", shape.n_experts}, {"null_gate", n_null_}})
                  : detail::LinearGate<T, Arch>(shape.d_model, {{"gate", shape.n_experts + n_null_}})) {}

  Index d_model() const { return d_model_; }             ///< token width
  Index n_experts() const { return n_experts_; }         ///< true experts n (ids in [0, n))
  Index n_null_experts() const { return n_null_; }       ///< null experts m
  Index top_k() const { return top_k_; }                 ///< slots per token (true or null)
  /// What backward reads: the probabilities, and the chosen true experts' logits for weights whose
  /// probabilities underflow (detail::renormalize).
  struct Saved {
    T* probabilities = nullptr;  ///< (n_tokens, n + m)
    T* chosen_logits = nullptr;  ///< (n_tokens, top_k), -inf on a null slot
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const {
    Saved s;
    s.probabilities = arena.take<T>(n_tokens * balance_width());
    s.chosen_logits = arena.take<T>(n_tokens * top_k_);
    return s;
  }

  /// The gate, (n, d_model), or (n + m, d_model) with the null rows last when there is no separate projection.
  MatrixView<T> gate() { return gate_.block(0).value(); }
  ConstMatrixView<T> gate() const { return gate_.block(0).value(); }
  /// The null projection (m, d_model); only with separate_null_projection.
  MatrixView<T> null_gate() {
    moe::detail::require(separate_, "moe::routers::NullExpertRouter::null_gate: options.separate_null_projection is false");
    return gate_.block(1).value();
  }
  ConstMatrixView<T> null_gate() const {
    moe::detail::require(separate_, "moe::routers::NullExpertRouter::null_gate: options.separate_null_projection is false");
    return gate_.block(1).value();
  }

  /// Every gate from U(-1/sqrt(d_model), 1/sqrt(d_model)).
  void init(Rng& rng) { gate_.init(rng); }
  /// f(name, Parameter&) for "gate" (and "null_gate").
  template <class F>
  void visit_parameters(F&& f) {
    gate_.visit(f);
  }  /// No state besides the parameters.
  template <class F>
  void visit_state(F&&) {}

  /// True experts each token runs: the slots with an id >= 0 of `ids` (n_tokens, top_k).
  void true_experts_per_token(std::span<const Index> ids, std::span<Index> counts) const {
    count_active_slots(ids.data(), static_cast<Index>(counts.size()), top_k_, counts.data());
  }

  /// Routes in.x (n_tokens, d_model): ids (n_tokens, top_k) true expert or -1 (null), ordered by descending p;
  /// weights (n_tokens, top_k).
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    const Index width = balance_width();
    Index* chosen = arena.take<Index>(x.rows() * top_k_);  // (n_tokens, top_k) ids over n + m
    T* logits_rows = arena.take<T>(detail::n_token_chunks(x.rows()) * width);  // (n_chunks, n + m) scratch
    if (arena.measuring() || x.rows() == 0) return;
    detail::for_each_token_chunk(x.rows(), double(width) * double(d_model_), [&](Index c, Index t0, Index t1) {
      gate_.logits(x.middle_rows(t0, t1 - t0), MatrixView<T>(out.saved.probabilities + t0 * width, t1 - t0, width));
      choose(t0, t1, chosen, logits_rows + c * width, out);
    });
  }

  /// As route(), from logits (n_tokens, n + m) computed elsewhere (routers::WithLosses computes them once).
  void route_logits(ConstMatrixView<T> logits, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index width = balance_width();
    Index* chosen = arena.take<Index>(logits.rows() * top_k_);  // (n_tokens, top_k) ids over n + m
    T* logits_rows = arena.take<T>(detail::n_token_chunks(logits.rows()) * width);  // (n_chunks, n + m) scratch
    if (arena.measuring() || logits.rows() == 0) return;
    detail::for_each_token_chunk(logits.rows(), double(width) * double(d_model_), [&](Index c, Index t0, Index t1) {
      for (Index t = t0; t < t1; ++t) std::copy_n(logits.row(t), width, out.saved.probabilities + t * width);
      choose(t0, t1, chosen, logits_rows + c * width, out);
    });
  }

  /// Backward of route(): dL/dw on the true slots, through the renormalisation among true experts and the
  /// softmax over all n + m, adds dL/dx to grad.dx and accumulates the gates' gradients.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens(), width = balance_width();
    T* dlogits = arena.take<T>(n_tokens * width);  // (n_tokens, n + m)
    T* chosen = arena.take<T>(n_tokens * top_k_);  // (n_tokens, top_k) chosen probabilities, 0 for null
    T* dchosen = arena.take<T>(n_tokens * top_k_);  // (n_tokens, top_k)
    if (arena.measuring() || n_tokens == 0) return;
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(width) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      const T* p = out.saved.probabilities + t * width;
      const Index* id = out.ids + t * top_k_;
      T* u = chosen + t * top_k_;
      T* g = dchosen + t * top_k_;
      T* dz = dlogits + t * width;
      detail::gather_slots(p, id, grad.dweights + t * top_k_, top_k_, T(1), u, g);
      if (detail::renormalizes_in_log_space(u, top_k_)) {
        detail::renormalize_log_backward(ScoreFunction::softmax, out.saved.chosen_logits + t * top_k_, u, g, top_k_);
        detail::scatter_slots(id, g, top_k_, dz, width);
        continue;
      }
      detail::normalize_backward(u, g, top_k_);
      detail::scatter_slots(id, g, top_k_, dz, width);
      detail::score_backward(ScoreFunction::softmax, p, dz, width);
    }
    gate_.backward(in.x, ConstMatrixView<T>(dlogits, n_tokens, width), grad.dx);
  }

  /// @name Balance protocol (moe::BalanceRouter): the n + m columns are the true and the null experts
  /// (AdaMoE balances all of them as ordinary slots); p = softmax(z).
  /// @{
  Index balance_width() const { return n_experts_ + n_null_; }  ///< columns: n true + m null experts
  /// z (n_tokens, n + m) = the logits route() chooses on.
  void balance_logits(const RouteInput<T>& in, MatrixView<T> z, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    if (arena.measuring() || x.rows() == 0) return;
    detail::for_each_token_chunk(x.rows(), double(balance_width()) * double(d_model_), [&](Index, Index t0, Index t1) {
      gate_.logits(x.middle_rows(t0, t1 - t0), z.middle_rows(t0, t1 - t0));
    });
  }
  /// One token: s = p = softmax(z).
  void balance_probabilities(const T* z, T* s, T* p) const {
    kernels::softmax_row(Arch{}, z, s, balance_width());
    std::copy_n(s, balance_width(), p);
  }
  /// One token: g = dL/dp on entry (clobbered); ADDS dL/dz to dz.
  void balance_probabilities_backward(const T* s, const T* /*p*/, T* g, T* dz) const {
    detail::score_backward(ScoreFunction::softmax, s, g, balance_width());
    for (Index c = 0; c < balance_width(); ++c) dz[c] += g[c];
  }
  /// The column of each slot, null experts included: route()'s top-k over the saved probabilities, again.
  void balance_choice(const RouteOutput<T, Saved>& out, Index n_tokens, Index* cols) const {
    for (Index t = 0; t < n_tokens; ++t)
      kernels::top_k(Arch{}, out.saved.probabilities + t * balance_width(), balance_width(), top_k_, cols + t * top_k_);
  }
  /// From dz (n_tokens, n + m): accumulates the gates' gradients and ADDS dL/dx to grad.dx.
  void balance_logits_backward(const RouteInput<T>& in, ConstMatrixView<T> dz, const RouteGradient<T>& grad, Arena&) {
    if (in.n_tokens() > 0 && dz.data() != nullptr) gate_.backward(in.x, dz, grad.dx);
  }
  /// @}

 private:
  // Tokens [t0, t1), whose logits are in out.saved.probabilities: softmax over n + m in place, top-k, weights
  // renormalised among the true experts, their logits kept. `logits` (n + m) is scratch.
  void choose(Index t0, Index t1, Index* chosen, T* logits, const RouteOutput<T, Saved>& out) const {
    const Index width = balance_width();
    for (Index t = t0; t < t1; ++t) {
      T* p = out.saved.probabilities + t * width;
      std::copy_n(p, width, logits);
      kernels::softmax_row(Arch{}, p, p, width);
      Index* all = chosen + t * top_k_;
      kernels::top_k(Arch{}, p, width, top_k_, all);
      Index* id = out.ids + t * top_k_;
      T* w = out.weights + t * top_k_;
      T* z = out.saved.chosen_logits + t * top_k_;  // (top_k) the chosen true experts' logits
      for (Index s = 0; s < top_k_; ++s) {
        id[s] = all[s] < n_experts_ ? all[s] : -1;
        w[s] = id[s] >= 0 ? p[id[s]] : T(0);
        z[s] = id[s] >= 0 ? logits[id[s]] : -std::numeric_limits<T>::infinity();
      }
      detail::renormalize(ScoreFunction::softmax, z, w, top_k_);  // null slots hold 0: the sum is over the true experts
    }
  }

  static const NullExpertOptions& validated(const MoEConfig& shape, const NullExpertOptions& o) {
    constexpr const char* who = "moe::routers::NullExpertRouter";
    moe::detail::require(shape.d_model >= 1, who, ": d_model = ", shape.d_model, " must be >= 1");
    moe::detail::require(shape.n_experts >= 1, who, ": n_experts = ", shape.n_experts, " must be >= 1");
    moe::detail::require(o.n_null_experts >= 0, who, ": options.n_null_experts = ", o.n_null_experts, " must be >= 0");
    // The gate has n + m rows of d_model: n + m must not overflow, nor (n + m) * d_model the buffer.
    moe::detail::require(o.n_null_experts <= moe::detail::k_max_elements<T> - shape.n_experts, who,
                         ": n_experts + options.n_null_experts = ", shape.n_experts, " + ", o.n_null_experts,
                         " exceeds the ", moe::detail::k_max_elements<T>, " rows a gate may hold");
    moe::detail::checked_size<T>(who, "(n_experts + options.n_null_experts) * d_model",
                                 {shape.n_experts + o.n_null_experts, shape.d_model});
    moe::detail::require(shape.top_k >= 1 && shape.top_k <= shape.n_experts + o.n_null_experts, who, ": top_k = ",
                         shape.top_k, " must be in [1, n_experts + n_null_experts = ", shape.n_experts + o.n_null_experts,
                         "]");
    return o;
  }

  Index d_model_;
  Index n_experts_;
  Index n_null_;
  Index top_k_;
  bool separate_;
  detail::LinearGate<T, Arch> gate_;  // "gate" (n, d_model) + "null_gate" (m, d_model), or "gate" (n + m, d_model)
};

}  // namespace moe::routers
