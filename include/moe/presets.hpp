#pragma once
/// @file presets.hpp
/// @brief One-word aliases for published architectures. `...Type<T>` takes the scalar type; the plain
/// name is the float layer.

#include "experts/ffn.hpp"
#include "experts/zero_computation.hpp"
#include "moe_layer.hpp"
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

}  // namespace moe
