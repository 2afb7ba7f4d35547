#pragma once
/// @file routers/top_k_softmax.hpp
/// @brief Top-k softmax router: logits z = W_g x, p = softmax(z) over all experts, the top_k experts of p,
/// and (Mixtral form, the default) their weights renormalised to sum to 1 — which equals a softmax over
/// the k selected logits (PAPERS.md A.1). Without renormalisation the weights are the raw p (Qwen2-MoE,
/// DeepSeek-V2). A TopKRouter with the Mixtral knobs; bitwise the same results.

#include "../kernels/arch.hpp"
#include "../moe_config.hpp"
#include "top_k_router.hpp"

namespace moe::routers {

/// TopKSoftmax's one knob (designated initialisers: `TopKSoftmax<float>(cfg, {.renormalize = false})`).
struct TopKSoftmaxOptions {
  bool renormalize = true;  ///< divide the k weights by their sum (Mixtral); false: the raw p (Qwen2-MoE, DeepSeek-V2)
};

/// Top-k softmax router: TopKRouter with default options but for the renormalisation.
/// @tparam T    scalar type (float; double for references and gradient checks)
/// @tparam Arch instruction set of the kernels (see kernels/arch.hpp)
template <class T, class Arch = kernels::default_arch>
class TopKSoftmax : public TopKRouter<T, Arch> {
 public:
  /// @param cfg shape (validated: throws moe::Error naming the bad field)
  explicit TopKSoftmax(const MoEConfig& cfg, const TopKSoftmaxOptions& options = {})
      : TopKRouter<T, Arch>(cfg, TopKOptions{.renormalize = options.renormalize}) {}
};

}  // namespace moe::routers
