#include <moe/moe.hpp>

int odr_b() {
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 4, .d_ff = 8, .n_experts = 3, .top_k = 1});
  return static_cast<int>(layer.n_experts());
}
