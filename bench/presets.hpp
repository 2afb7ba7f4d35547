#pragma once
// Benchmark shapes, named like the real models they stand for.

#include <moe/moe_config.hpp>

namespace moe::bench {

struct Preset {
  const char* name;
  MoEConfig cfg;
};

/// small: a quick shape that stays in cache. mixtral: PERF.md's S1, Mixtral's expert count and d_ff/d_model
/// ratio at a quarter of its width.
inline constexpr Preset k_presets[] = {
    {"small", {.d_model = 256, .d_ff = 512, .n_experts = 8, .top_k = 2}},
    {"mixtral", {.d_model = 1024, .d_ff = 3584, .n_experts = 8, .top_k = 2}},
};

inline constexpr Index k_token_counts[] = {1, 8, 128, 512};

/// Active-expert FLOPs of one forward: three projections of 2 d_model d_ff FLOPs per slot.
inline double active_flops(const MoEConfig& c, Index n_tokens) {
  return 6.0 * double(n_tokens) * double(c.top_k) * double(c.d_model) * double(c.d_ff);
}

}  // namespace moe::bench
