// End to end training (RELIABILITY/issue 5 "training sanity"): an MoE with one expert per regime learns a
// mixture-of-regimes regression to a loss well below the best single FFN of the same active FLOPs, as one
// layer and as a 2-layer moe::Stack with a balance loss, trained with moe::train_loop.

#include <vector>

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

// A stack trained full-batch with AdamW for `steps`; returns the last task loss (the aux loss is reported apart).
template <class Stack>
moe::StepReport train_stack(Stack& stack, const moe::examples::Regimes& data, long steps) {
  moe::optim::AdamW<double> adam({.lr = 1e-2, .weight_decay = 0});
  moe::StackContext<double> ctx;
  moe::RowMatrix<double> y(data.x.rows(), data.x.cols()), dx(data.x.rows(), data.x.cols()), dy;
  return moe::train_loop({.steps = steps, .progress = nullptr}, [&](long, moe::Rng&) {
           stack.zero_grad();
           const double aux = stack.forward(data.x, y, ctx);
           const double loss = moe::examples::mse(y, data.target, dy);
           stack.backward(dy, dx, ctx);
           adam.step(stack);
           return moe::StepReport{loss, aux, data.x.rows()};
         })
      .last;
}

}  // namespace

TEST_CASE("An MoE learns a mixture of regimes far better than one FFN of the same active FLOPs", "[integration]") {
  const moe::Index d = 8, ff = 16;
  const auto data = moe::examples::make_regimes(256, d, 4, 1);
  // Top-1 without renormalisation, so the router trains through the weight (Switch style).
  moe::MoELayer<moe::routers::TopKSoftmax<double>, moe::experts::SwiGLU<double>> moe_layer(
      moe::routers::TopKSoftmax<double>({.d_model = d, .d_ff = ff, .n_experts = 4, .top_k = 1}, {.renormalize = false}),
      moe::experts::SwiGLU<double>({.d_model = d, .d_ff = ff, .n_experts = 4, .top_k = 1}));
  moe::MixtralMoEType<double> dense({.d_model = d, .d_ff = ff, .n_experts = 1, .top_k = 1});
  moe_layer.init(2);
  dense.init(2);
  const double moe_loss = train(moe_layer, data, 300), dense_loss = train(dense, data, 300);
  INFO("MoE loss " << moe_loss << ", dense loss " << dense_loss);
  REQUIRE(moe_loss < 0.5 * dense_loss);
}

TEST_CASE("A 2-layer MoE stack learns the mixture far better than a 2-layer dense stack of the same active FLOPs",
          "[integration][stack]") {
  const moe::Index d = 8, ff = 16;
  const auto data = moe::examples::make_regimes(256, d, 4, 3);
  using Router = moe::routers::WithLosses<moe::routers::TopKRouter<double>, moe::losses::SwitchLoss>;
  using Layer = moe::MoELayer<Router, moe::experts::SwiGLU<double>>;
  const auto make = [&](moe::Index experts) {
    const moe::MoEConfig cfg{.d_model = d, .d_ff = ff, .n_experts = experts, .top_k = 1};
    std::vector<Layer> layers;
    for (int l = 0; l < 2; ++l)
      layers.emplace_back(Router(moe::routers::TopKRouter<double>(cfg, {.renormalize = false}),
                                 moe::losses::SwitchLoss{.coeff = 1e-2}),
                          moe::experts::SwiGLU<double>(cfg));
    moe::Stack<Layer> stack(std::move(layers));
    stack.init(4);
    return stack;
  };
  auto moe_stack = make(4), dense_stack = make(1);
  const auto moe_run = train_stack(moe_stack, data, 300), dense_run = train_stack(dense_stack, data, 300);
  INFO("MoE stack loss " << moe_run.loss << " (aux " << moe_run.aux_loss << "), dense stack loss " << dense_run.loss);
  REQUIRE(moe_run.loss < 0.5 * dense_run.loss);
  // One expert per layer: the Switch loss is exactly its coefficient, per layer.
  CHECK(dense_run.aux_loss == Approx(2e-2).epsilon(1e-12));
  CHECK(moe_run.aux_loss > 0);
}
