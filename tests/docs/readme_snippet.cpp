#include <moe/moe.hpp>
#include <iostream>

int main() {
  // A Mixtral-style layer: 8 SwiGLU experts, 2 per token.
  moe::MixtralMoE layer({.d_model = 256, .d_ff = 512, .n_experts = 8, .top_k = 2});
  layer.init(/*seed=*/42);

  moe::RowMatrix<float> x = moe::RowMatrix<float>::Random(16, 256);  // (n_tokens, d_model)
  moe::RowMatrix<float> y(16, 256);
  auto routing = layer.forward(x, y);  // throws moe::Error on bad shapes or NaN

  for (int e = 0; e < layer.n_experts(); ++e)
    std::cout << "expert " << e << ": " << routing.tokens_per_expert[e] << " tokens\n";
  return y.allFinite() ? 0 : 1;
}
