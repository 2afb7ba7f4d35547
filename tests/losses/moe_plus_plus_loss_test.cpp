// losses::MoEPlusPlusLoss (arXiv 2410.07348, Eq. 7): a hand-computed batch, the uniform closed form (no factor of
// the expert count), and a gradient through p only (central finite differences of the value, the choice fixed).

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/losses/moe_plus_plus_loss.hpp>

#include "support/balance.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::MoEPlusPlusLoss;
using moe::test::OwnedBatch;

TEST_CASE("MoEPlusPlusLoss on a hand-computed batch: η = τ on zero-computation experts, f per token", "[loss][moepp]") {
  // Columns 0, 1 FFN, 2, 3 zero-computation; 2 tokens, K = 2: token 0 chooses {0, 2}, token 1 {1, 3}, so
  // f = (0.5, 0.5, 0.5, 0.5) (Σ f = K). p rows (0.4, 0.1, 0.3, 0.2), (0.1, 0.5, 0.2, 0.2): P = (0.25, 0.3, 0.25, 0.2).
  // τ = 0.75: Σ η f P = 0.5 · (0.25 + 0.3 + 0.75 · 0.25 + 0.75 · 0.2) = 0.44375; β = 0.01 gives 0.0044375.
  // dL/dp[t, c] = β η_c f_c / T = 0.0025 (FFN), 0.001875 (zero-computation).
  OwnedBatch b(2, 4, 2);
  b.zero_computation = {0, 0, 1, 1};
  b.p = {0.4, 0.1, 0.3, 0.2, 0.1, 0.5, 0.2, 0.2};
  b.cols = {0, 2, 1, 3};
  std::vector<double> dp, dz;
  CHECK(moe::test::evaluate(MoEPlusPlusLoss{.coeff = 0.01, .tau = 0.75}, b, dp, dz) ==
        Approx(0.0044375).epsilon(1e-14));
  for (Index t = 0; t < 2; ++t) {
    CHECK(dp[static_cast<std::size_t>(t * 4 + 1)] == Approx(0.0025).epsilon(1e-14));
    CHECK(dp[static_cast<std::size_t>(t * 4 + 3)] == Approx(0.001875).epsilon(1e-14));
  }
  for (double g : dz) CHECK(g == 0.0);
}

TEST_CASE("MoEPlusPlusLoss: uniform routing gives coeff · K / E; dp is the finite difference in p",
          "[loss][moepp][grad]") {
  std::vector<double> dp, dz, scratch_dp, scratch_dz;
  for (const Index E : {4, 12}) {
    for (const Index k : {1, 2}) {
      OwnedBatch b(3 * E, E, k);
      b.p.assign(static_cast<std::size_t>(3 * E * E), 1.0 / double(E));
      for (Index t = 0; t < 3 * E; ++t)
        for (Index s = 0; s < k; ++s) b.cols.push_back((t + s) % E);
      CHECK(moe::test::evaluate(MoEPlusPlusLoss{.coeff = 0.01, .tau = 1.0}, b, dp, dz) ==
            Approx(0.01 * double(k) / double(E)).epsilon(1e-14));
    }
  }
  moe::test::Rng rng(2);
  OwnedBatch b(9, 6, 2);
  b.zero_computation = {0, 0, 0, 1, 1, 1};
  b.z = moe::test::normal_vector<double>(rng, 54);
  b.softmax_from_logits();
  for (Index t = 0; t < 9; ++t)
    for (Index s = 0; s < 2; ++s) b.cols.push_back((t + 4 * s) % 6);
  const MoEPlusPlusLoss loss{.coeff = 0.5, .tau = 0.3};
  moe::test::evaluate(loss, b, dp, dz);
  double worst = 0;
  for (std::size_t i = 0; i < b.p.size(); ++i) {
    const double keep = b.p[i], h = 1e-6;
    b.p[i] = keep + h;
    const double up = moe::test::evaluate(loss, b, scratch_dp, scratch_dz);
    b.p[i] = keep - h;
    const double down = moe::test::evaluate(loss, b, scratch_dp, scratch_dz);
    b.p[i] = keep;
    worst = std::max(worst, std::abs((up - down) / (2 * h) - dp[i]));
  }
  CHECK(worst < 1e-8);
  CHECK_THROWS_WITH(moe::test::evaluate(MoEPlusPlusLoss{.tau = -1.0}, b, dp, dz), Catch::Contains("tau = -1"));
}
