// ODR check: the umbrella header in two translation units of one program (a missing `inline` fails to link).
#include <moe/moe.hpp>

int odr_b();

int main() {
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 4, .d_ff = 8, .n_experts = 2, .top_k = 1});
  return (layer.n_experts() == 2 && odr_b() == 3) ? 0 : 1;
}
