// A downstream program: one forward of a small Mixtral-style layer; exit 0 when the output is finite and
// the routing used top_k slots per token.
#include <moe/moe.hpp>

int main() {
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 32, .d_ff = 64, .n_experts = 4, .top_k = 2});
  layer.init(1);
  const moe::RowMatrix<float> x = moe::RowMatrix<float>::Random(8, 32);
  moe::RowMatrix<float> y(8, 32);
  const auto routing = layer.forward(x, y);
  long slots = 0;
  for (auto c : routing.tokens_per_expert) slots += c;
  return (y.allFinite() && slots == 16 && MOE_VERSION_MAJOR == 0) ? 0 : 1;
}
