// reference/naive_moe.hpp: the oracle itself, on cases small enough to compute by hand.

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/presets.hpp>
#include <moe/reference/naive_moe.hpp>

using moe::Index;

TEST_CASE("naive_moe_forward computes a one-feature layer by hand", "[reference]") {
  // d_model = d_ff = 1, two experts, top-1. Gate (1, -1): a positive token goes to expert 0, a negative one
  // to expert 1. Expert 0 has w1 = w3 = w2 = 1: y = silu(x) * x. Expert 1 has w1 = 1, w3 = 2, w2 = -1:
  // y = -2 x silu(x). Renormalised top-1 weight is 1.
  moe::MixtralMoEType<double> layer({.d_model = 1, .d_ff = 1, .n_experts = 2, .top_k = 1});
  layer.router().gate()(0, 0) = 1;
  layer.router().gate()(1, 0) = -1;
  auto& bank = layer.bank<0>();
  bank.w1(0)(0, 0) = 1, bank.w3(0)(0, 0) = 1, bank.w2(0)(0, 0) = 1;
  bank.w1(1)(0, 0) = 1, bank.w3(1)(0, 0) = 2, bank.w2(1)(0, 0) = -1;
  moe::RowMatrix<double> x(2, 1);
  x << 2.0, -3.0;
  std::vector<std::vector<Index>> chosen;
  const auto y = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<double>(x), &chosen);
  const auto silu = [](double v) { return v / (1 + std::exp(-v)); };
  REQUIRE(chosen[0] == std::vector<Index>{0});
  REQUIRE(chosen[1] == std::vector<Index>{1});
  CHECK(y(0, 0) == Approx(silu(2.0) * 2.0).epsilon(1e-15));
  CHECK(y(1, 0) == Approx(-2.0 * -3.0 * silu(-3.0)).epsilon(1e-15));
}

TEST_CASE("naive_activation knows every activation name and rejects others", "[reference]") {
  CHECK(moe::reference::naive_activation("relu")(-1.5) == 0.0);
  CHECK(moe::reference::naive_activation("gelu")(1.0) == Approx(0.8413447460685429).epsilon(1e-14));
  CHECK(moe::reference::naive_activation("gelu_tanh")(1.0) == Approx(0.8411919906082768).epsilon(1e-14));
  CHECK(moe::reference::naive_activation("silu")(0.0) == 0.0);
  REQUIRE_THROWS(moe::reference::naive_activation("swish2"));
}
