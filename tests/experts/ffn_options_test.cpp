// experts::FFN with FFNOptions: biases (forward against a naive double loop, gradients against finite
// differences, the zero-token expert), the activations the base test does not cover (SiLU plain, GELU plain,
// ReGLU, GeGLU-tanh), and the seeded init policies. Kept apart from ffn_test.cpp, whose forward checks
// follow the forward-path rewrite.

#include <cmath>
#include <string_view>
#include <variant>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::experts::FFN;
using moe::experts::FFNOptions;
namespace kernels = moe::kernels;

namespace {

template <class Bank>
void check_forward(const moe::MoEConfig& cfg, const std::vector<Index>& counts, bool bias, double bound) {
  Bank bank(cfg, {.bias = bias});
  INFO(Bank::Activation::name() << " gated=" << Bank::gated << " bias=" << bias);
  moe::test::check_bank_forward(bank, counts, moe::test::naive_ffn_bank<Bank>, bound, 41);
}

template <class Bank>
void check_gradient(const moe::MoEConfig& cfg, const std::vector<Index>& counts, bool bias) {
  Bank bank(cfg, {.bias = bias});
  moe::Rng rng(43);
  bank.init(rng);
  const auto offsets = moe::test::offsets_from(counts);
  RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, offsets.back(), cfg.d_model);
  INFO(Bank::Activation::name() << " gated=" << Bank::gated << " bias=" << bias);
  const double biggest = moe::test::check_bank_gradients(
      bank, xs, cfg.d_model,
      [&](moe::MatrixView<double> ys, moe::Arena& arena) { bank.forward(xs, offsets.data(), ys, arena); },
      [&](moe::ConstMatrixView<double> dys, moe::MatrixView<double> dxs, moe::Arena& arena) {
        bank.backward(xs, offsets.data(), dys, dxs, arena);
      });
  REQUIRE(biggest > 1e-3);
}

}  // namespace

TEST_CASE("FFN bank with biases, and every activation, matches a naive loop", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 33, .d_ff = 300, .n_experts = 4, .top_k = 1};
  const std::vector<Index> counts = {3, 0, 17, 1};
  for (const bool bias : {false, true}) {
    check_forward<FFN<float, kernels::SiLU, true>>(cfg, counts, bias, 1e-7);
    check_forward<FFN<double, kernels::SiLU, true>>(cfg, counts, bias, 1e-24);
    check_forward<FFN<float, kernels::SiLU, false>>(cfg, counts, bias, 1e-7);
    check_forward<FFN<double, kernels::GELU, false>>(cfg, counts, bias, 1e-24);
    check_forward<FFN<float, kernels::GELUTanh, true>>(cfg, counts, bias, 1e-7);
    check_forward<FFN<float, kernels::ReLU, true>>(cfg, counts, bias, 1e-7);
  }
  // Bias columns across the bank's 256-column tiles.
  check_forward<FFN<float, kernels::SiLU, true>>({.d_model = 257, .d_ff = 513, .n_experts = 2, .top_k = 1}, {3, 2},
                                                 true, 1e-7);
}

TEST_CASE("FFN bank backward, with and without biases, matches central finite differences in double",
          "[expert][grad]") {
  const moe::MoEConfig cfg{.d_model = 5, .d_ff = 7, .n_experts = 3, .top_k = 1};
  const std::vector<Index> counts = {2, 0, 3};
  check_gradient<FFN<double, kernels::SiLU, true>>(cfg, counts, false);
  check_gradient<FFN<double, kernels::GELU, true>>(cfg, counts, false);
  check_gradient<FFN<double, kernels::GELUTanh, false>>(cfg, counts, false);
  check_gradient<FFN<double, kernels::ReLU, false>>(cfg, counts, false);
  check_gradient<FFN<double, kernels::SiLU, true>>({.d_model = 17, .d_ff = 9, .n_experts = 2, .top_k = 1}, {4, 1},
                                                   false);
  check_gradient<FFN<double, kernels::SiLU, true>>(cfg, counts, true);
  check_gradient<FFN<double, kernels::SiLU, false>>(cfg, counts, true);
  check_gradient<FFN<double, kernels::SiLU, false>>(cfg, counts, false);
  check_gradient<FFN<double, kernels::GELU, false>>(cfg, counts, true);
  check_gradient<FFN<double, kernels::GELUTanh, true>>(cfg, counts, true);
  check_gradient<FFN<double, kernels::ReLU, true>>(cfg, counts, true);
}

TEST_CASE("FFN bank with biases: an expert without rows keeps exactly zero gradients", "[expert][grad]") {
  FFN<float> bank({.d_model = 16, .d_ff = 24, .n_experts = 3, .top_k = 1}, {.bias = true});
  moe::test::check_empty_expert_gradient(bank);
  Index names = 0;
  bank.visit_parameters([&](std::string_view, moe::Parameter<float>&) { ++names; });
  REQUIRE(names == 6);
}

TEST_CASE("FFN init policies are seeded and selectable per bank", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 64, .d_ff = 96, .n_experts = 2, .top_k = 1};
  const auto weights = [&](FFNOptions opts, std::uint64_t seed) {
    FFN<double> bank(cfg, opts);
    moe::Rng rng(seed);
    bank.init(rng);
    return bank;
  };
  // Same seed, same weights; another seed, other weights.
  auto a = weights({}, 7), b = weights({}, 7), c = weights({}, 8);
  REQUIRE(a.w1(1)(3, 4) == b.w1(1)(3, 4));
  REQUIRE(a.w1(1)(3, 4) != c.w1(1)(3, 4));
  // Default: nn.Linear, U(-1/sqrt(in), 1/sqrt(in)), biases too.
  auto u = weights({.bias = true}, 7);
  double w2_max = 0, b2_max = 0;
  for (Index i = 0; i < 64; ++i) {
    b2_max = std::max(b2_max, std::abs(u.b2(1)(0, i)));
    for (Index j = 0; j < 96; ++j) w2_max = std::max(w2_max, std::abs(u.w2(1)(i, j)));
  }
  REQUIRE(w2_max <= 1 / std::sqrt(96.0));
  REQUIRE(w2_max > 0.9 / std::sqrt(96.0));
  REQUIRE(b2_max <= 1 / std::sqrt(96.0));
  REQUIRE(b2_max > 0);
  // Normal(std): the sample std of 2 * 96 * 64 values is within 3 % of 0.02; biases zero (as HF does).
  auto n = weights({.bias = true, .init = moe::experts::Normal{.std = 0.02}}, 7);
  double sum2 = 0;
  for (Index e = 0; e < 2; ++e)
    for (Index i = 0; i < 96; ++i)
      for (Index j = 0; j < 64; ++j) sum2 += n.w1(e)(i, j) * n.w1(e)(i, j);
  REQUIRE(std::sqrt(sum2 / (2 * 96 * 64)) == Approx(0.02).epsilon(0.03));
  REQUIRE(n.b1(0)(0, 5) == 0.0);
  // Zeros: everything zero.
  auto z = weights({.init = moe::experts::Zeros{}}, 7);
  REQUIRE(z.w3(1)(95, 63) == 0.0);
  // A bank without biases has no b1().
  REQUIRE_THROWS_WITH(a.b1(0), Catch::Contains("FFNOptions{.bias = true}"));
}
