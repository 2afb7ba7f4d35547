// losses::SwitchLoss: the closed forms of issue 5 (uniform routing gives exactly coeff, one expert with P = 1
// gives coeff · E, the value moves with the routing) and a gradient through p only.

#include <cmath>
#include <utility>

#include <catch2/catch.hpp>
#include <moe/losses/switch_loss.hpp>

#include "support/balance.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::SwitchLoss;
using moe::test::OwnedBatch;

namespace {

// T tokens, E columns, k slots; token t chooses columns (t + s) mod E; every p row uniform.
OwnedBatch uniform(Index T, Index E, Index k) {
  OwnedBatch b(T, E, k);
  b.p.assign(static_cast<std::size_t>(T * E), 1.0 / double(E));
  for (Index t = 0; t < T; ++t)
    for (Index s = 0; s < k; ++s) b.cols.push_back((t + s) % E);
  return b;
}

}  // namespace

TEST_CASE("SwitchLoss: uniform routing gives exactly coeff, all on one expert with P = 1 gives coeff · E", "[loss]") {
  std::vector<double> dp, dz;
  for (const Index E : {2, 8, 64}) {
    for (const Index k : {1, 2}) {
      // T a multiple of E: every column gets the same number of slots.
      CHECK(moe::test::evaluate(SwitchLoss{.coeff = 0.01}, uniform(4 * E, E, k), dp, dz) == Approx(0.01).epsilon(1e-14));
    }
    OwnedBatch one(5, E, 1);
    one.p.assign(static_cast<std::size_t>(5 * E), 0.0);
    for (Index t = 0; t < 5; ++t) {
      one.p[static_cast<std::size_t>(t * E)] = 1.0;
      one.cols.push_back(0);
    }
    CHECK(moe::test::evaluate(SwitchLoss{.coeff = 0.01}, one, dp, dz) == Approx(0.01 * double(E)).epsilon(1e-14));
  }
}

TEST_CASE("SwitchLoss: the value follows the routing, and its gradient is coeff · E · f / T on p only", "[loss]") {
  moe::test::Rng rng(3);
  OwnedBatch b(7, 5, 2);
  b.z = moe::test::normal_vector<double>(rng, 35);
  b.softmax_from_logits();
  b.cols = {0, 1, 0, 2, 0, 1, 3, 0, 0, 4, 1, 0, 2, 0};
  std::vector<double> dp, dz;
  // Reference in plain loops: f from the slots (Σf = 1), P the mean probability.
  const auto reference = [&] {
    std::vector<double> f(5, 0.0), P(5, 0.0);
    for (Index c : b.cols) f[static_cast<std::size_t>(c)] += 1.0 / 14.0;
    for (Index t = 0; t < 7; ++t)
      for (Index c = 0; c < 5; ++c) P[static_cast<std::size_t>(c)] += b.p[static_cast<std::size_t>(t * 5 + c)] / 7.0;
    double value = 0;
    for (std::size_t c = 0; c < 5; ++c) value += 0.1 * 5.0 * f[c] * P[c];
    return std::pair{value, f};
  };
  const double before = moe::test::evaluate(SwitchLoss{.coeff = 0.1}, b, dp, dz);
  const auto [expected, f] = reference();
  CHECK(before == Approx(expected).epsilon(1e-13));
  for (Index t = 0; t < 7; ++t)
    for (Index c = 0; c < 5; ++c)
      CHECK(dp[static_cast<std::size_t>(t * 5 + c)] == Approx(0.1 * 5.0 * f[static_cast<std::size_t>(c)] / 7.0).epsilon(1e-13));
  for (double g : dz) CHECK(g == 0.0);  // nothing through the logits directly

  // Other routing, other value (the loss is not a constant, huggingface/transformers#28093).
  b.cols[0] = 4;
  b.cols[2] = 3;
  const double after = moe::test::evaluate(SwitchLoss{.coeff = 0.1}, b, dp, dz);
  CHECK(after == Approx(reference().first).epsilon(1e-13));
  CHECK(std::abs(after - before) > 1e-3);
}

TEST_CASE("SwitchLoss: unused slots (-1) are not counted, an empty batch gives 0, bad coefficients throw", "[loss]") {
  OwnedBatch b = uniform(4, 4, 2);
  for (Index t = 0; t < 4; ++t) b.cols[static_cast<std::size_t>(t * 2 + 1)] = -1;  // only the first slots count
  std::vector<double> dp, dz;
  CHECK(moe::test::evaluate(SwitchLoss{.coeff = 1.0}, b, dp, dz) == Approx(1.0).epsilon(1e-14));
  CHECK(moe::test::evaluate(SwitchLoss{.coeff = 1.0}, OwnedBatch(0, 4, 2), dp, dz) == 0.0);
  CHECK_THROWS_WITH(moe::test::evaluate(SwitchLoss{.coeff = -1.0}, b, dp, dz), Catch::Contains("coeff = -1"));
  CHECK_THROWS_WITH(moe::test::evaluate(SwitchLoss{.coeff = std::nan("")}, b, dp, dz), Catch::Contains("coeff"));
}
