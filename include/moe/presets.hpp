#pragma once
/// @file presets.hpp
/// @brief One-word aliases for published architectures. `...Type<T>` takes the scalar type; the plain
/// name is the float layer.

#include "experts/ffn.hpp"
#include "moe_layer.hpp"
#include "routers/top_k_softmax.hpp"

namespace moe {

/// Mixtral (arXiv 2401.04088): softmax over all experts, top-k, weights renormalised; SwiGLU experts.
/// Mixtral 8x7B itself is MoEConfig{.d_model = 4096, .d_ff = 14336, .n_experts = 8, .top_k = 2}.
template <class T>
using MixtralMoEType = MoELayer<routers::TopKSoftmax<T>, experts::SwiGLU<T>>;
using MixtralMoE = MixtralMoEType<float>;

}  // namespace moe
