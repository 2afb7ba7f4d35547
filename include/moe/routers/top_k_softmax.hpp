#pragma once
/// @file routers/top_k_softmax.hpp
/// @brief Top-k softmax router: logits z = W_g x, p = softmax(z) over all experts, the top_k experts of p,
/// and (Mixtral form, the default) their weights renormalised to sum to 1 — which equals a softmax over
/// the k selected logits (PAPERS.md A.1). Without renormalisation the weights are the raw p (Qwen2-MoE,
/// DeepSeek-V2).

#include <algorithm>
#include <cmath>
#include <vector>

#include <xsimd/memory/xsimd_aligned_allocator.hpp>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../kernels/simd/softmax.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
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
        gate_(static_cast<std::size_t>(n_experts_ * d_model_), T(0)) {}

  Index d_model() const { return d_model_; }      ///< token width
  Index n_experts() const { return n_experts_; }  ///< experts routed over
  Index top_k() const { return top_k_; }          ///< slots per token
  bool renormalize() const { return renormalize_; }  ///< whether the k weights are renormalised

  /// The gate weight W_g, (n_experts, d_model) row-major (Hugging Face `gate.weight` layout).
  MatrixView<T> gate() { return {gate_.data(), n_experts_, d_model_}; }
  ConstMatrixView<T> gate() const { return {gate_.data(), n_experts_, d_model_}; }

  /// Fills W_g from U(-1/sqrt(d_model), 1/sqrt(d_model)), the nn.Linear default.
  void init(Rng& rng) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(d_model_));
    for (auto& w : gate_) w = static_cast<T>(rng.uniform(-bound, bound));
  }

  /// Routes x (n_tokens, d_model) to ids (n_tokens, top_k), ordered by descending probability (ties: lower
  /// id first), and weights (n_tokens, top_k). Logits that are NaN rank below every other expert.
  void route(ConstMatrixView<T> x, Index* ids, T* weights, Arena& arena) const {
    const Index n_tokens = x.rows();
    T* probs = arena.take<T>(n_tokens * n_experts_);  // (n_tokens, n_experts)
    if (arena.measuring() || n_tokens == 0) return;

    // Token chunks of fixed size: the split does not depend on the thread count, so neither do results.
    constexpr Index chunk = 16;
    const Index n_chunks = (n_tokens + chunk - 1) / chunk;
    MOE_OMP(omp parallel for schedule(static))
    for (Index c = 0; c < n_chunks; ++c) {
      const Index t0 = c * chunk, t1 = std::min(n_tokens, t0 + chunk);
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

 private:
  Index d_model_;
  Index n_experts_;
  Index top_k_;
  bool renormalize_;
  std::vector<T, xsimd::aligned_allocator<T, 64>> gate_;  // (n_experts, d_model)
};

}  // namespace moe::routers
