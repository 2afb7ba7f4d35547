#pragma once
/// @file routers/top_k_softmax.hpp
/// @brief Top-k softmax router: logits z = W_g x, p = softmax(z) over all experts, the top_k experts of p,
/// and (Mixtral form, the default) their weights renormalised to sum to 1 — which equals a softmax over
/// the k selected logits (PAPERS.md A.1). Without renormalisation the weights are the raw p (Qwen2-MoE,
/// DeepSeek-V2).

#include <algorithm>
#include <string_view>

#include "../config.hpp"
#include "../detail/linalg.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../kernels/simd/softmax.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"

namespace moe::routers {

/// Top-k softmax router.
/// @tparam T    scalar type (float; double for references and gradient checks)
/// @tparam Arch instruction set of the kernels (see kernels/arch.hpp)
template <class T, class Arch = kernels::default_arch>
class TopKSoftmax {
 public:
  using Scalar = T;

  /// @param cfg shape (validated: throws moe::Error naming the bad field)
  /// @param renormalize divide the k weights by their sum (Mixtral: true)
  explicit TopKSoftmax(const MoEConfig& cfg, bool renormalize = true)
      : d_model_(cfg.validated().d_model),
        n_experts_(cfg.n_experts),
        top_k_(cfg.top_k),
        renormalize_(renormalize),
        gate_(n_experts_, d_model_) {}

  Index d_model() const { return d_model_; }      ///< token width
  Index n_experts() const { return n_experts_; }  ///< experts routed over
  Index top_k() const { return top_k_; }          ///< slots per token
  bool renormalize() const { return renormalize_; }  ///< whether the k weights are renormalised
  Index saved_width() const { return n_experts_; }   ///< saved per token for backward: the probabilities

  /// The gate weight W_g, (n_experts, d_model) row-major (Hugging Face `gate.weight` layout).
  MatrixView<T> gate() { return gate_.value(); }
  ConstMatrixView<T> gate() const { return gate_.value(); }

  /// Fills W_g from U(-1/sqrt(d_model), 1/sqrt(d_model)), the nn.Linear default.
  void init(Rng& rng) { gate_.init_uniform(rng, d_model_); }

  /// Calls f(name, Parameter&) for W_g ("gate").
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("gate"), gate_);
  }

  /// Routes x (n_tokens, d_model) to ids (n_tokens, top_k), ordered by descending probability (ties: lower
  /// id first), and weights (n_tokens, top_k); saved (n_tokens, n_experts) receives the probabilities.
  /// Logits that are NaN rank below every other expert.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, T* saved, Arena& arena) const {
    const Index n_tokens = x.rows();
    if (arena.measuring() || n_tokens == 0) return;
    T* probs = saved;  // (n_tokens, n_experts)

    // Token chunks of fixed size: the split does not depend on the thread count, so neither do results.
    const Index n_chunks = (n_tokens + k_chunk - 1) / k_chunk;
    const double work = double(n_tokens) * double(n_experts_) * double(d_model_);
    MOE_OMP(omp parallel for schedule(static) if(work >= detail::k_parallel_min_work))
    for (Index c = 0; c < n_chunks; ++c) {
      const Index t0 = c * k_chunk, t1 = std::min(n_tokens, t0 + k_chunk);
      kernels::matmul_nt(Arch{}, x.middle_rows(t0, t1 - t0), gate(),
                         MatrixView<T>(probs + t0 * n_experts_, t1 - t0, n_experts_));
      for (Index t = t0; t < t1; ++t) {
        T* p = probs + t * n_experts_;
        kernels::softmax_row(Arch{}, p, p, n_experts_);
        Index* id = ids + t * top_k_;
        T* w = weights + t * top_k_;
        kernels::top_k(Arch{}, p, n_experts_, top_k_, id);
        T sum = 0;
        for (Index s = 0; s < top_k_; ++s) sum += (w[s] = p[id[s]]);
        // A zero sum only arises from a row with no finite logit (softmax_row then yields zeros);
        // the weights stay 0 instead of becoming 0/0.
        if (renormalize_ && sum > T(0))
          for (Index s = 0; s < top_k_; ++s) w[s] /= sum;
      }
    }
  }

  /// Backward of route(): from dweights (n_tokens, top_k) adds dL/dx to dx (n_tokens, d_model) and
  /// accumulates dL/dW_g. Through the renormalisation, dL/dp_i = (dw_s - sum_s' dw_s' w_s') / S for the
  /// selected i (S = sum of their p), 0 for the others; then the softmax Jacobian, dz = p (dp - <dp, p>).
  /// With top_k = 1 and renormalisation the weight is constantly 1, so the router gets no gradient.
  void route_backward(ConstMatrixView<T> x, const Index* ids, const T* weights, const T* saved, const T* dweights,
                      MatrixView<T> dx, Arena& arena) {
    const Index n_tokens = x.rows();
    T* dlogits = arena.take<T>(n_tokens * n_experts_);  // (n_tokens, n_experts)
    if (arena.measuring() || n_tokens == 0) return;

    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) >= detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      const T* p = saved + t * n_experts_;
      const Index* id = ids + t * top_k_;
      const T* w = weights + t * top_k_;
      const T* dw = dweights + t * top_k_;
      T* dz = dlogits + t * n_experts_;
      std::fill_n(dz, n_experts_, T(0));  // dz holds dL/dp until the Jacobian below
      T sum = 0, dot = 0;
      for (Index s = 0; s < top_k_; ++s) {
        sum += p[id[s]];
        dot += dw[s] * w[s];
      }
      if (sum <= T(0)) continue;  // no finite logit: the weights were set, not computed
      for (Index s = 0; s < top_k_; ++s) dz[id[s]] = renormalize_ ? (dw[s] - dot) / sum : dw[s];
      T dp_dot_p = 0;
      for (Index e = 0; e < n_experts_; ++e) dp_dot_p += dz[e] * p[e];
      for (Index e = 0; e < n_experts_; ++e) dz[e] = p[e] * (dz[e] - dp_dot_p);
    }

    const ConstMatrixView<T> dz(dlogits, n_tokens, n_experts_);
    detail::add_matmul_tn(dz, x, gate_.grad());  // dW_g += dz^T x  (n_experts, d_model)
    detail::add_matmul_nn(dz, ConstMatrixView<T>(gate_.value()), dx);  // dx += dz W_g  (n_tokens, d_model)
  }

 private:
  Index d_model_;
  Index n_experts_;
  Index top_k_;
  static constexpr Index k_chunk = 16;  // tokens per work item of route()
  bool renormalize_;
  Parameter<T> gate_;  // W_g (n_experts, d_model)
};

}  // namespace moe::routers
