// optim/adamw.hpp: torch.optim.AdamW's update by hand, and a small MoE that trains.

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>
#include <moe/optim/adamw.hpp>

#include "optim/one_parameter.hpp"
#include "support/random.hpp"

using Catch::Matchers::Contains;

TEST_CASE("AdamW follows torch.optim.AdamW for three steps", "[optim]") {
  moe::test::OneParameter model(1.0, 0.5);
  const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
  moe::optim::AdamW<double> adam({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  double p = 1.0, m = 0, v = 0;
  const double grads[] = {0.5, -0.25, 2.0};
  for (int t = 1; t <= 3; ++t) {
    const double g = grads[t - 1];
    model.p.grad()(0, 0) = g;
    adam.step(model);
    p *= 1 - lr * wd;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    p -= lr * (m / (1 - std::pow(b1, t))) / (std::sqrt(v / (1 - std::pow(b2, t))) + eps);
    CHECK(model.value() == Approx(p).epsilon(1e-12));
  }
  CHECK(adam.steps() == 3);
  CHECK(model.value() != 1.0);
}

TEST_CASE("AdamWConfig is validated", "[optim][error]") {
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.lr = -1}), Contains("lr = -1"));
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.beta2 = 1.0}), Contains("beta2 = 1"));
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.eps = 0}), Contains("eps = 0"));
}

TEST_CASE("AdamW trains a small MoE layer to fit a linear map", "[optim][layer]") {
  moe::MixtralMoEType<double> layer({.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  layer.init(1);
  moe::Rng rng(2);
  const moe::RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 64, 8);
  const moe::RowMatrix<double> target = x * moe::test::normal_matrix<double>(rng, 8, 8, 0.5);
  moe::optim::AdamW<double> adam({.lr = 1e-2, .weight_decay = 0});
  moe::TrainingContext<double> ctx;
  moe::RowMatrix<double> y(64, 8), dx(64, 8);
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    layer.zero_grad();
    layer.forward(x, y, ctx);
    const moe::RowMatrix<double> diff = y - target;
    const double loss = diff.squaredNorm() / double(diff.size());
    (step == 0 ? first : last) = loss;
    layer.backward(moe::RowMatrix<double>(2.0 * diff / double(diff.size())), dx, ctx);
    adam.step(layer);
  }
  INFO("loss " << first << " -> " << last);
  REQUIRE(last < 0.2 * first);
}
