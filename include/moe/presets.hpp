#pragma once
/// @file presets.hpp
/// @brief One-word aliases for published architectures. `...Type<T>` takes the scalar type; the plain
/// name is the float layer.

#include "experts/ffn.hpp"
#include "experts/shared.hpp"
#include "experts/zero_computation.hpp"
#include "moe_layer.hpp"
#include "routers/top_k_router.hpp"
#include "routers/top_k_softmax.hpp"

namespace moe {

/// Mixtral (arXiv 2401.04088): softmax over all experts, top-k, weights renormalised; SwiGLU experts.
/// Mixtral 8x7B itself is MoEConfig{.d_model = 4096, .d_ff = 14336, .n_experts = 8, .top_k = 2}.
template <class T>
using MixtralMoEType = MoELayer<routers::TopKSoftmax<T>, experts::SwiGLU<T>>;
using MixtralMoE = MixtralMoEType<float>;

/// MoE++ (arXiv 2410.07348): FFN experts followed by constant, copy and zero experts, in the paper's
/// order. Build it from its parts, e.g. MoE++ 0.6B's 8 FFN + 2 constant + 1 copy + 1 zero, top-2 over all
/// 12 with the paper's unrenormalised softmax weights:
///   MoEPlusPlus layer(routers::TopKSoftmax<float>({.d_model = d, .d_ff = ff, .n_experts = 12, .top_k = 2},
///                                                 {.renormalize = false}),
///                     experts::SwiGLU<float>({.d_model = d, .d_ff = ff, .n_experts = 8}),
///                     experts::ConstantExperts<float>(2, d), experts::CopyExperts<float>(1, d),
///                     experts::ZeroExperts<float>(1, d));
template <class T>
using MoEPlusPlusType = MoELayer<routers::TopKSoftmax<T>, experts::SwiGLU<T>, experts::ConstantExperts<T>,
                                 experts::CopyExperts<T>, experts::ZeroExperts<T>>;
using MoEPlusPlus = MoEPlusPlusType<float>;

/// The routed SwiGLU experts of the presets below, in weight storage `Storage` (kernels::NativeWeights,
/// BF16Weights, Int8Weights, or PackedOnly<...> of them for inference).
template <class T, class Storage = kernels::NativeWeights>
using RoutedSwiGLU = experts::FFN<T, kernels::SiLU, true, kernels::default_arch, Storage>;

/// Routed SwiGLU experts under any TopKRouter preset: the MoE block of Mixtral, Qwen3-MoE, OLMoE and
/// DeepSeek-V2/V3 without their shared experts. Build with a preset:
///   SwiGLUMoEType<float> layer{routers::TopKRouter<float>(cfg, routers::presets::qwen3_moe()),
///                              experts::SwiGLU<float>(cfg)};
template <class T, class Storage = kernels::NativeWeights>
using SwiGLUMoEType = MoELayer<routers::TopKRouter<T>, RoutedSwiGLU<T, Storage>>;

/// The shared experts of DeepSeekMoE: added as they are.
template <class T>
using DeepSeekMoEShared = experts::Shared<experts::SwiGLU<T>>;
/// DeepSeekMoE (arXiv 2401.06066; DeepSeek-V2/V3): fine-grained routed SwiGLU experts plus always-on shared
/// SwiGLU experts whose output is added unweighted. DeepSeek's checkpoints hold the n_shared shared experts as
/// one MLP of width n_shared × moe_intermediate_size, which is the same function: make_deepseek_moe builds that.
template <class T, class Storage = kernels::NativeWeights>
using DeepSeekMoEType = MoELayer<routers::TopKRouter<T>, RoutedSwiGLU<T, Storage>, DeepSeekMoEShared<T>>;
using DeepSeekMoE = DeepSeekMoEType<float>;

/// The shared expert of Qwen2-MoE: scaled per token by sigmoid(w_sg · x).
template <class T>
using Qwen2MoEShared = experts::Shared<experts::SwiGLU<T>, experts::SigmoidSharedGate>;
/// Qwen1.5/Qwen2-MoE: routed SwiGLU experts plus one shared SwiGLU expert (width
/// shared_expert_intermediate_size) gated by sigmoid(w_sg · x).
template <class T, class Storage = kernels::NativeWeights>
using Qwen2MoEType = MoELayer<routers::TopKRouter<T>, RoutedSwiGLU<T, Storage>, Qwen2MoEShared<T>>;
using Qwen2MoE = Qwen2MoEType<float>;

/// The experts of Switch Transformers (arXiv 2101.03961): y = W_o ReLU(W_i x), no gate projection.
template <class T, class Storage = kernels::NativeWeights>
using SwitchExperts = experts::FFN<T, kernels::ReLU, false, kernels::default_arch, Storage>;
/// A Switch/GShard-style layer: top-1 (routers::presets::switch_transformer) over ReLU FFN experts.
template <class T, class Storage = kernels::NativeWeights>
using SwitchMoEType = MoELayer<routers::TopKRouter<T>, SwitchExperts<T, Storage>>;

/// A DeepSeekMoE layer: `routed` gives d_model, the routed experts' d_ff, n_experts and top_k; `shared_d_ff` the
/// width of the merged shared MLP (n_shared × d_ff); `router` the routing (default DeepSeek-V3's; give the
/// group knobs that fit n_experts). Weights start at 0: call init() or load them.
template <class T = float>
DeepSeekMoEType<T> make_deepseek_moe(const MoEConfig& routed, Index shared_d_ff,
                                     const routers::TopKOptions& router = routers::presets::deepseek_v3()) {
  return {routers::TopKRouter<T>(routed, router), experts::SwiGLU<T>(routed),
          DeepSeekMoEShared<T>(MoEConfig{.d_model = routed.d_model, .d_ff = shared_d_ff, .n_experts = 1, .top_k = 1})};
}

/// A Qwen2-MoE layer: `routed` as above, `shared_d_ff` the shared expert's width; Qwen2-MoE's routing by default.
template <class T = float>
Qwen2MoEType<T> make_qwen2_moe(const MoEConfig& routed, Index shared_d_ff,
                               const routers::TopKOptions& router = routers::presets::qwen2_moe()) {
  return {routers::TopKRouter<T>(routed, router), experts::SwiGLU<T>(routed),
          Qwen2MoEShared<T>(MoEConfig{.d_model = routed.d_model, .d_ff = shared_d_ff, .n_experts = 1, .top_k = 1})};
}

}  // namespace moe
