// losses::SequenceBalanceLoss (DeepSeek-V3): per-sequence Switch form averaged over sequences; one sequence
// equals SwitchLoss; single-domain sequences are penalised even when the batch as a whole is balanced.

#include <catch2/catch.hpp>
#include <moe/losses/sequence_balance.hpp>
#include <moe/losses/switch_loss.hpp>

#include "support/balance.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::losses::SequenceBalanceLoss;
using moe::losses::SwitchLoss;

TEST_CASE("SequenceBalanceLoss: one sequence is the Switch loss, two skewed sequences cost more", "[loss]") {
  moe::test::Rng rng(5);
  moe::test::OwnedBatch b(8, 4, 1);
  b.z = moe::test::normal_vector<double>(rng, 32);
  b.softmax_from_logits();
  b.cols = {0, 0, 0, 0, 1, 1, 1, 1};
  std::vector<double> dp_seq, dp_switch, dz;
  const double whole = moe::test::evaluate(SequenceBalanceLoss{.coeff = 0.1}, b, dp_seq, dz);
  CHECK(whole == Approx(moe::test::evaluate(SwitchLoss{.coeff = 0.1}, b, dp_switch, dz)).epsilon(1e-14));
  CHECK(dp_seq == dp_switch);

  // Two sequences of 4, each on one expert: within each, f = (1, 0, 0, 0) or (0, 1, 0, 0).
  b.sequence_of_token = {0, 0, 0, 0, 1, 1, 1, 1};
  const double split = moe::test::evaluate(SequenceBalanceLoss{.coeff = 0.1}, b, dp_seq, dz);
  double expected = 0;
  for (Index s = 0; s < 2; ++s) {
    double P = 0;  // mean probability of the sequence's expert (column s) over its 4 tokens
    for (Index t = 4 * s; t < 4 * s + 4; ++t) P += b.p[static_cast<std::size_t>(t * 4 + s)] / 4.0;
    expected += 0.1 * 4.0 * P / 2.0;
    for (Index t = 4 * s; t < 4 * s + 4; ++t)
      CHECK(dp_seq[static_cast<std::size_t>(t * 4 + s)] == Approx(0.1 * 4.0 / (2.0 * 4.0)).epsilon(1e-14));
  }
  CHECK(split == Approx(expected).epsilon(1e-13));

  // Each token puts 0.7 on its sequence's expert: the batch as a whole is balanced over experts 0 and 1
  // (f = (1/2, 1/2, 0, 0), P = (0.4, 0.4, 0.1, 0.1)), each sequence is not (f = (1, 0, 0, 0), P = 0.7).
  for (Index t = 0; t < 8; ++t)
    for (Index c = 0; c < 4; ++c) b.p[static_cast<std::size_t>(t * 4 + c)] = c == t / 4 ? 0.7 : 0.1;
  CHECK(moe::test::evaluate(SwitchLoss{.coeff = 0.1}, b, dp_switch, dz) == Approx(0.1 * 4.0 * 0.4).epsilon(1e-14));
  CHECK(moe::test::evaluate(SequenceBalanceLoss{.coeff = 0.1}, b, dp_seq, dz) == Approx(0.1 * 4.0 * 0.7).epsilon(1e-14));
}
