#pragma once
// Benchmark shapes of issue #6 (PERF.md), named like the models they stand for.

#include <moe/moe_config.hpp>

namespace moe::bench {

struct Preset {
  const char* name;
  MoEConfig cfg;
};

/// S1: Mixtral's expert count, top-2 and d_ff/d_model ratio at a quarter of its width.
/// S2: fine-grained experts (DeepSeek/Qwen-MoE style): many small experts, top-6.
inline constexpr Preset k_presets[] = {
    {"S1", {.d_model = 1024, .d_ff = 3584, .n_experts = 8, .top_k = 2}},
    {"S2", {.d_model = 1024, .d_ff = 512, .n_experts = 64, .top_k = 6}},
};

inline constexpr Index k_token_counts[] = {1, 8, 128, 512};

/// Active-expert FLOPs of one forward: three projections of 2 d_model d_ff FLOPs per slot.
inline double active_flops(const MoEConfig& c, Index n_tokens) {
  return 6.0 * double(n_tokens) * double(c.top_k) * double(c.d_model) * double(c.d_ff);
}

}  // namespace moe::bench
