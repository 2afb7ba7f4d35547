#pragma once
/// @file moe_config.hpp
/// @brief MoEConfig: the runtime shape of a layer, validated with an error that names the bad field.

#include "config.hpp"

namespace moe {

/// Shape of an MoE layer whose router and single expert bank share one configuration.
/// Use designated initialisers: `moe::MoEConfig{.d_model = 1024, .d_ff = 3584, .n_experts = 8, .top_k = 2}`.
struct MoEConfig {
  Index d_model = 0;    ///< width of a token row
  Index d_ff = 0;       ///< hidden width of each FFN expert
  Index n_experts = 0;  ///< number of routed experts
  Index top_k = 2;      ///< experts chosen per token, 1 <= top_k <= n_experts

  /// Throws moe::Error naming the first invalid field and its value.
  void validate() const {
    detail::require(d_model >= 1, "moe::MoEConfig: d_model = ", d_model, " must be >= 1");
    detail::require(d_ff >= 1, "moe::MoEConfig: d_ff = ", d_ff, " must be >= 1");
    detail::require(n_experts >= 1, "moe::MoEConfig: n_experts = ", n_experts, " must be >= 1");
    detail::require(top_k >= 1, "moe::MoEConfig: top_k = ", top_k, " must be >= 1");
    detail::require(top_k <= n_experts, "moe::MoEConfig: top_k = ", top_k, " exceeds n_experts = ", n_experts);
  }
  /// validate(), then *this: lets constructors check the config before allocating anything.
  const MoEConfig& validated() const {
    validate();
    return *this;
  }
};

}  // namespace moe
