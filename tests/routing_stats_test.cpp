// RoutingStats: counts and metrics against hand-built routings, CSV output, and a real MoE++ layer.

#include <cmath>
#include <sstream>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using moe::Index;

namespace {

moe::ForwardResult<float> result(Index n_tokens, Index k, const std::vector<Index>& ids, const std::vector<float>& w,
                                 Index dropped = 0) {
  return {n_tokens, k, ids, w, {}, {}, dropped};
}

}  // namespace

TEST_CASE("RoutingStats counts by hand", "[stats]") {
  // 4 experts, expert 3 zero-computation; 3 tokens, top-2; token 2 has one unused slot.
  moe::RoutingStats stats({false, false, false, true});
  const std::vector<Index> ids = {0, 3, 1, 0, 3, -1};
  const std::vector<float> w = {0.75f, 0.25f, 0.5f, 0.5f, 1.0f, 0.0f};
  const std::vector<int> domain = {7, 7, 9};
  stats.record(result(3, 2, ids, w, 1), domain);
  REQUIRE(stats.n_tokens() == 3);
  REQUIRE(stats.tokens_per_expert() == std::vector<long>{2, 1, 0, 2});
  REQUIRE(stats.weight_mass() == std::vector<double>{1.25, 0.5, 0.0, 1.25});
  REQUIRE(stats.unused_slots() == 1);
  REQUIRE(stats.dropped_slots() == 1);
  REQUIRE(stats.real_experts_per_token() == std::vector<long>{1, 1, 1});  // 1, 2 and 0 real experts
  REQUIRE(stats.zero_computation_per_token() == std::vector<long>{1, 2});
  CHECK(stats.mean_real_experts_per_token() == Approx(1.0));
  REQUIRE(stats.tokens_per_group().at(7) == std::vector<long>{2, 1, 0, 1});
  REQUIRE(stats.tokens_per_group().at(9) == std::vector<long>{0, 0, 0, 1});
  // Loads (2, 1, 0, 2), mean 1.25: MaxVio = 2/1.25 - 1, CV = sqrt(mean squared deviation)/mean.
  CHECK(stats.max_violation() == Approx(0.6));
  CHECK(stats.coefficient_of_variation() == Approx(std::sqrt((0.5625 + 0.0625 + 1.5625 + 0.5625) / 4) / 1.25));
  const double h = -(2 * 0.4 * std::log(0.4) + 0.2 * std::log(0.2)) / std::log(4.0);
  CHECK(stats.load_entropy() == Approx(h));

  std::ostringstream csv;
  stats.write_csv(csv);
  REQUIRE(csv.str().rfind("expert,zero_computation,tokens,weight_mass,group_7,group_9\n0,0,2,1.25,2,0\n", 0) == 0);
  REQUIRE(csv.str().find("# tokens=3 unused_slots=1 dropped_slots=1") != std::string::npos);

  stats.reset();
  REQUIRE(stats.n_tokens() == 0);
  REQUIRE(stats.dropped_slots() == 0);
  REQUIRE(stats.max_violation() == 0);
  REQUIRE(stats.tokens_per_group().empty());
}

TEST_CASE("RoutingStats::group_specialization is I(group; expert) / H(group)", "[stats]") {
  moe::RoutingStats stats(std::vector<bool>(4, false));
  // Two groups, top-1. Perfect specialisation: group 0 only on expert 0, group 1 only on expert 1.
  stats.record(result(4, 1, {0, 0, 1, 1}, {1, 1, 1, 1}), std::vector<int>{0, 0, 1, 1});
  CHECK(stats.group_specialization() == Approx(1.0).epsilon(1e-14));
  // No specialisation: both groups spread the same way over experts 0 and 1.
  stats.reset();
  stats.record(result(4, 1, {0, 1, 0, 1}, {1, 1, 1, 1}), std::vector<int>{0, 0, 1, 1});
  CHECK(stats.group_specialization() == Approx(0.0).margin(1e-15));
  // By hand: group 0 -> experts (0, 0, 1), group 1 -> (1); p(g, e) = 2/4, 1/4 | 0, 1/4.
  stats.reset();
  stats.record(result(4, 1, {0, 0, 1, 1}, {1, 1, 1, 1}), std::vector<int>{0, 0, 0, 1});
  const double mi = 0.5 * std::log(0.5 / (0.75 * 0.5)) + 0.25 * std::log(0.25 / (0.75 * 0.5)) +
                    0.25 * std::log(0.25 / (0.25 * 0.5));
  const double h = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));
  CHECK(stats.group_specialization() == Approx(mi / h).epsilon(1e-13));
  // Without group labels there is nothing to measure.
  stats.reset();
  stats.record(result(4, 1, {0, 0, 1, 1}, {1, 1, 1, 1}));
  CHECK(stats.group_specialization() == 0.0);
}

TEST_CASE("RoutingStats: even load has entropy 1 and no violation", "[stats]") {
  moe::RoutingStats stats(std::vector<bool>(4, false));
  stats.record(result(2, 2, {0, 1, 2, 3}, {0.5f, 0.5f, 0.5f, 0.5f}));
  CHECK(stats.load_entropy() == Approx(1.0));
  CHECK(stats.max_violation() == 0.0);
  CHECK(stats.coefficient_of_variation() == 0.0);
}

TEST_CASE("RoutingStats rejects labels that do not match the tokens and unknown experts", "[stats][error]") {
  moe::RoutingStats stats(std::vector<bool>(2, false));
  const std::vector<int> one = {1};
  REQUIRE_THROWS_AS(stats.record(result(2, 1, {0, 1}, {1.f, 1.f}), one), moe::Error);
  REQUIRE_THROWS_AS(stats.record(result(1, 1, {5}, {1.f})), moe::Error);
  REQUIRE_THROWS_AS(moe::RoutingStats(std::vector<bool>{}), moe::Error);
}

TEST_CASE("RoutingStats on a MoE++ layer knows its zero-computation experts", "[stats][layer]") {
  moe::MoEPlusPlus layer(moe::routers::TopKSoftmax<float>({.d_model = 8, .d_ff = 8, .n_experts = 6, .top_k = 2}),
                         moe::experts::SwiGLU<float>({.d_model = 8, .d_ff = 8, .n_experts = 3}),
                         moe::experts::ConstantExperts<float>(1, 8), moe::experts::CopyExperts<float>(1, 8),
                         moe::experts::ZeroExperts<float>(1, 8));
  layer.init(4);
  REQUIRE(layer.zero_computation_mask() == std::vector<bool>{false, false, false, true, true, true});
  moe::RoutingStats stats(layer);
  moe::Rng rng(1);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 50, 8);
  moe::RowMatrix<float> y(50, 8);
  stats.record(layer.forward(x, y));
  long total = 0;
  for (long c : stats.tokens_per_expert()) total += c;
  REQUIRE(total == 100);
  long zc = 0;
  for (std::size_t n = 0; n < stats.zero_computation_per_token().size(); ++n) zc += long(n) * stats.zero_computation_per_token()[n];
  REQUIRE(zc == stats.tokens_per_expert()[3] + stats.tokens_per_expert()[4] + stats.tokens_per_expert()[5]);
}
