// losses::AdaMoELoss (arXiv 2406.13233, Eq. 6): a hand-computed batch, the shared null frequency against the
// per-null ablation, the uniform closed form, its relation to SwitchLoss without nulls, and gradients through p
// only (a central finite difference of the value in p, with the choice fixed).

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/losses/adamoe_loss.hpp>
#include <moe/losses/switch_loss.hpp>

#include "support/balance.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::AdaMoELoss;
using moe::test::OwnedBatch;

TEST_CASE("AdaMoELoss on a hand-computed batch: nulls share one frequency, f counted per token", "[loss][null]") {
  // n = 2 true, m = 2 null columns, 2 tokens, top-2. Token 0 chooses {0, 2}, token 1 {1, 2}:
  // f = (0.5, 0.5, 1, 0) per token (Σ f = 2); the nulls' mean frequency is 0.5, so f̃ = (0.5, 0.5, 0.5, 0.5).
  // p rows (0.4, 0.1, 0.3, 0.2) and (0.1, 0.5, 0.2, 0.2): P = (0.25, 0.3, 0.25, 0.2).
  // Σ f̃ P = 0.5 · (0.25 + 0.3 + 0.25 + 0.2) = 0.5, so l = 0.1 · (2 + 2) · 0.5 = 0.2; dl/dp[t, c] = 0.1 · 4 · 0.5 / 2.
  // The per-null ablation: Σ f P = 0.125 + 0.15 + 0.25 + 0 = 0.525, l = 0.21.
  OwnedBatch b(2, 4, 2);
  b.n_null = 2;
  b.p = {0.4, 0.1, 0.3, 0.2, 0.1, 0.5, 0.2, 0.2};
  b.cols = {0, 2, 1, 2};
  std::vector<double> dp, dz;
  CHECK(moe::test::evaluate(AdaMoELoss{.coeff = 0.1}, b, dp, dz) == Approx(0.2).epsilon(1e-14));
  for (double g : dp) CHECK(g == Approx(0.1).epsilon(1e-14));
  for (double g : dz) CHECK(g == 0.0);
  CHECK(moe::test::evaluate(AdaMoELoss{.coeff = 0.1, .balance_nulls = true}, b, dp, dz) == Approx(0.21).epsilon(1e-14));
  CHECK(dp[3] == 0.0);  // the unused null gets no push of its own
}

TEST_CASE("AdaMoELoss: uniform routing gives coeff · k; without nulls it is top_k × SwitchLoss", "[loss][null]") {
  std::vector<double> dp, dz, dp_switch;
  for (const Index k : {1, 2, 3}) {
    OwnedBatch b(12, 6, k);
    b.n_null = 2;
    b.p.assign(72, 1.0 / 6.0);
    for (Index t = 0; t < 12; ++t)
      for (Index s = 0; s < k; ++s) b.cols.push_back((t + s) % 6);
    CHECK(moe::test::evaluate(AdaMoELoss{.coeff = 0.01}, b, dp, dz) == Approx(0.01 * double(k)).epsilon(1e-14));
  }
  moe::test::Rng rng(5);
  OwnedBatch b(7, 5, 2);
  b.z = moe::test::normal_vector<double>(rng, 35);
  b.softmax_from_logits();
  b.cols = {0, 1, 0, 2, 0, 1, 3, 0, 0, 4, 1, 0, 2, 0};
  const double ada = moe::test::evaluate(AdaMoELoss{.coeff = 0.1}, b, dp, dz);
  const double sw = moe::test::evaluate(moe::losses::SwitchLoss{.coeff = 0.1}, b, dp_switch, dz);
  CHECK(ada == Approx(2 * sw).epsilon(1e-13));
  for (std::size_t i = 0; i < dp.size(); ++i) CHECK(dp[i] == Approx(2 * dp_switch[i]).epsilon(1e-13));
}

TEST_CASE("AdaMoELoss: its dp is the central finite difference of the value in p (choice fixed)",
          "[loss][null][grad]") {
  moe::test::Rng rng(11);
  OwnedBatch b(9, 7, 3);
  b.n_null = 3;
  b.z = moe::test::normal_vector<double>(rng, 63);
  b.softmax_from_logits();
  for (Index t = 0; t < 9; ++t)
    for (Index s = 0; s < 3; ++s) b.cols.push_back((2 * t + 3 * s) % 7);
  std::vector<double> dp, dz, scratch_dp, scratch_dz;
  moe::test::evaluate(AdaMoELoss{.coeff = 0.3}, b, dp, dz);
  double worst = 0;
  for (std::size_t i = 0; i < b.p.size(); ++i) {
    const double keep = b.p[i], h = 1e-6;
    b.p[i] = keep + h;
    const double up = moe::test::evaluate(AdaMoELoss{.coeff = 0.3}, b, scratch_dp, scratch_dz);
    b.p[i] = keep - h;
    const double down = moe::test::evaluate(AdaMoELoss{.coeff = 0.3}, b, scratch_dp, scratch_dz);
    b.p[i] = keep;
    worst = std::max(worst, std::abs((up - down) / (2 * h) - dp[i]));
  }
  CHECK(worst < 1e-8);
  CHECK_THROWS_WITH(moe::test::evaluate(AdaMoELoss{.coeff = -1.0}, b, dp, dz), Catch::Contains("coeff = -1"));
}
