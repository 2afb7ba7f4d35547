// End to end training (RELIABILITY/issue 5 "training sanity"): an MoE with one expert per regime learns a
// mixture-of-regimes regression to a loss well below the best single FFN of the same active FLOPs.

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "common/regimes.hpp"

namespace {

template <class Layer>
double train(Layer& layer, const moe::examples::Regimes& data, int steps) {
  moe::optim::AdamW<double> adam({.lr = 1e-2, .weight_decay = 0});
  moe::TrainingContext<double> ctx;
  moe::RowMatrix<double> y(data.x.rows(), data.x.cols()), dx(data.x.rows(), data.x.cols()), dy;
  double loss = 0;
  for (int s = 0; s < steps; ++s) {
    layer.zero_grad();
    layer.forward(data.x, y, ctx);
    loss = moe::examples::mse(y, data.target, dy);
    layer.backward(dy, dx, ctx);
    adam.step(layer);
  }
  return loss;
}

}  // namespace

TEST_CASE("An MoE learns a mixture of regimes far better than one FFN of the same active FLOPs", "[integration]") {
  const moe::Index d = 8, ff = 16;
  const auto data = moe::examples::make_regimes(256, d, 4, 1);
  // Top-1 without renormalisation, so the router trains through the weight (Switch style).
  moe::MoELayer<moe::routers::TopKSoftmax<double>, moe::experts::SwiGLU<double>> moe_layer(
      moe::routers::TopKSoftmax<double>({.d_model = d, .d_ff = ff, .n_experts = 4, .top_k = 1}, false),
      moe::experts::SwiGLU<double>({.d_model = d, .d_ff = ff, .n_experts = 4, .top_k = 1}));
  moe::MixtralMoEType<double> dense({.d_model = d, .d_ff = ff, .n_experts = 1, .top_k = 1});
  moe_layer.init(2);
  dense.init(2);
  const double moe_loss = train(moe_layer, data, 300), dense_loss = train(dense, data, 300);
  INFO("MoE loss " << moe_loss << ", dense loss " << dense_loss);
  REQUIRE(moe_loss < 0.5 * dense_loss);
}
