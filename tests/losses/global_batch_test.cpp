// losses::GlobalBatchLoss ("Demons in the Detail"): counts accumulate in the caller's GlobalBatchCounts over
// training forwards until reset(), inference forwards read without advancing, no counts means this micro-batch alone,
// the all-reduce hook sees (and may replace) each micro-batch's counts, and the value equals the Switch form over the
// concatenated micro-batches' f.

#include <catch2/catch.hpp>
#include <moe/losses/global_batch.hpp>
#include <moe/losses/switch_loss.hpp>

#include "support/balance.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::GlobalBatchLoss;

namespace {

// A micro-batch of 4 tokens, top-1, all on column `c`, with random probabilities.
moe::test::OwnedBatch single_domain(Index c, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  moe::test::OwnedBatch b(4, 4, 1);
  b.z = moe::test::normal_vector<double>(rng, 16);
  b.softmax_from_logits();
  b.cols.assign(4, c);
  return b;
}

double mean_p(const moe::test::OwnedBatch& b, Index c) {
  double s = 0;
  for (Index t = 0; t < b.n_tokens; ++t) s += b.p[static_cast<std::size_t>(t * b.width + c)];
  return s / double(b.n_tokens);
}

}  // namespace

TEST_CASE("GlobalBatchLoss: f over every micro-batch since reset(), P from the current one", "[loss]") {
  GlobalBatchLoss loss(0.1);
  moe::GlobalBatchCounts counts;
  std::vector<double> dp, dz;
  auto a = single_domain(0, 1), b = single_domain(1, 2);
  a.global_batch = b.global_batch = &counts;
  // First micro-batch: the global f is its own: (1, 0, 0, 0).
  CHECK(moe::test::evaluate(loss, a, dp, dz) == Approx(0.1 * 4.0 * mean_p(a, 0)).epsilon(1e-14));
  CHECK(counts.micro_batches == 1);
  // evaluate() runs forward twice (measure, then run); only the real run counts.
  CHECK(counts.counts[0] == 4.0);
  // Second: f = (1/2, 1/2, 0, 0) over both, P from b only.
  const double second = moe::test::evaluate(loss, b, dp, dz);
  CHECK(second == Approx(0.1 * 4.0 * 0.5 * (mean_p(b, 0) + mean_p(b, 1))).epsilon(1e-14));
  CHECK(dp[0] == Approx(0.1 * 4.0 * 0.5 / 4.0).epsilon(1e-14));
  CHECK(dp[2] == 0.0);
  CHECK(counts.micro_batches == 2);

  // An inference forward reads the buffer and its own counts, and changes nothing.
  auto eval = b;
  eval.training = false;
  CHECK(moe::test::evaluate(loss, eval, dp, dz) ==
        Approx(0.1 * 4.0 * (1.0 / 3.0 * mean_p(b, 0) + 2.0 / 3.0 * mean_p(b, 1))).epsilon(1e-14));
  CHECK(counts.micro_batches == 2);
  CHECK(counts.counts[1] == 4.0);

  // A recomputation of b (activation checkpointing) reproduces its value and counts nothing.
  counts.recomputing = true;
  CHECK(moe::test::evaluate(loss, b, dp, dz) == second);
  CHECK(counts.micro_batches == 2);
  CHECK(counts.counts[1] == 4.0);
  counts.recomputing = false;

  // reset(): the next micro-batch starts a new global batch (the micro-batch loss again).
  counts.reset();
  CHECK(counts.micro_batches == 0);
  std::vector<double> dp_switch;
  CHECK(moe::test::evaluate(loss, b, dp, dz) ==
        Approx(moe::test::evaluate(moe::losses::SwitchLoss{.coeff = 0.1}, b, dp_switch, dz)).epsilon(1e-14));
}

TEST_CASE("GlobalBatchLoss: the all-reduce hook sees each training micro-batch's counts before they count", "[loss]") {
  GlobalBatchLoss loss(0.1);
  std::vector<std::vector<double>> seen;
  // A stand-in for a second process that routed its 4 tokens to column 3.
  loss.set_all_reduce([&](std::span<double> counts) {
    seen.emplace_back(counts.begin(), counts.end());
    counts[3] += 4.0;
  });
  moe::GlobalBatchCounts counts;
  std::vector<double> dp, dz;
  auto a = single_domain(0, 3);
  a.global_batch = &counts;
  const double value = moe::test::evaluate(loss, a, dp, dz);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0] == std::vector<double>{4, 0, 0, 0});
  CHECK(value == Approx(0.1 * 4.0 * 0.5 * (mean_p(a, 0) + mean_p(a, 3))).epsilon(1e-14));
  auto eval = a;
  eval.training = false;
  moe::test::evaluate(loss, eval, dp, dz);
  CHECK(seen.size() == 1);  // inference forwards do not communicate
  CHECK_THROWS_WITH(GlobalBatchLoss(-0.5), Catch::Contains("coeff = -0.5"));
}

TEST_CASE("GlobalBatchLoss without counts is the micro-batch loss, and writes nothing", "[loss]") {
  const GlobalBatchLoss loss(0.1);
  const auto b = single_domain(2, 4);  // no global_batch
  std::vector<double> dp, dz, dp_switch;
  CHECK(moe::test::evaluate(loss, b, dp, dz) ==
        Approx(moe::test::evaluate(moe::losses::SwitchLoss{.coeff = 0.1}, b, dp_switch, dz)).epsilon(1e-14));
  CHECK(dp == dp_switch);
}
