// RoutingPlan: the counting sort of (token, slot) pairs by expert (include/moe/routing_plan.hpp).

#include <set>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/routing_plan.hpp>

#include "support/random.hpp"

using moe::Index;

namespace {

struct PlanFixture {
  moe::Workspace ws;
  moe::RoutingPlan plan;
  PlanFixture(Index n_tokens, Index k, Index n_experts) {
    moe::Arena measure;
    moe::RoutingPlan::carve(measure, n_tokens, k, n_experts);
    ws.reserve(measure.peak());
    moe::Arena arena(ws);
    plan = moe::RoutingPlan::carve(arena, n_tokens, k, n_experts);
  }
};

}  // namespace

TEST_CASE("RoutingPlan groups every slot exactly once, stably, by expert", "[plan]") {
  moe::test::Rng rng(21);
  for (Index E : {1, 2, 3, 8, 64, 256}) {
    for (Index T : {1, 2, 7, 130}) {
      const Index k = std::min<Index>(E, 3);
      std::vector<Index> ids(static_cast<std::size_t>(T * k));
      for (Index t = 0; t < T; ++t) {
        std::set<Index> used;  // distinct experts per token, as routers guarantee
        for (Index s = 0; s < k; ++s) {
          Index e;
          do e = rng.below(E); while (used.count(e));
          used.insert(e);
          ids[static_cast<std::size_t>(t * k + s)] = e;
        }
      }
      PlanFixture f(T, k, E);
      f.plan.build(ids.data());
      const auto& p = f.plan;
      REQUIRE(p.n_rows() == T * k);
      for (Index e = 0; e < E; ++e) {
        Index brute = 0;
        for (Index e2 : ids) brute += (e2 == e);
        REQUIRE(p.counts[e] == brute);
        REQUIRE(p.offsets[e + 1] - p.offsets[e] == brute);
        for (Index r = p.offsets[e] + 1; r < p.offsets[e + 1]; ++r) REQUIRE(p.row_token[r - 1] < p.row_token[r]);
      }
      std::vector<int> hit(static_cast<std::size_t>(T * k), 0);
      for (Index i = 0; i < T * k; ++i) {
        const Index row = p.slot_row[i];
        REQUIRE(row >= p.offsets[ids[static_cast<std::size_t>(i)]]);
        REQUIRE(row < p.offsets[ids[static_cast<std::size_t>(i)] + 1]);
        REQUIRE(p.row_token[row] == i / k);
        ++hit[static_cast<std::size_t>(row)];
      }
      for (int h : hit) REQUIRE(h == 1);
    }
  }
}

TEST_CASE("RoutingPlan skips dropped slots and rejects out-of-range ids", "[plan][error]") {
  PlanFixture f(3, 2, 4);
  const std::vector<Index> ids = {2, -1, -1, -1, 0, 2};
  f.plan.build(ids.data());
  REQUIRE(f.plan.n_rows() == 3);
  REQUIRE(f.plan.slot_row[1] == -1);
  REQUIRE(f.plan.slot_row[2] == -1);
  REQUIRE(f.plan.counts[2] == 2);
  REQUIRE(f.plan.row_token[f.plan.slot_row[5]] == 2);
  REQUIRE(std::vector<Index>(f.plan.experts_per_token, f.plan.experts_per_token + 3) == std::vector<Index>{1, 0, 2});

  const std::vector<Index> bad = {0, 1, 4, 0, 1, 2};
  REQUIRE_THROWS_WITH(f.plan.build(bad.data()), Catch::Matchers::Contains("expert id 4 out of range [0, 4)"));
}

TEST_CASE("RoutingPlan links each sequence's rows on an expert, in token order", "[plan]") {
  // Top-2 over 3 experts, tokens 0..4 in sequences {0, 1, 2} and {3, 4}; token 2's second slot dropped.
  PlanFixture f(5, 2, 3);
  const std::vector<Index> ids = {0, 1, 1, 0, 0, -1, 0, 2, 0, 1};
  const std::vector<Index> sequence_of_token = {0, 0, 0, 1, 1};
  f.plan.build(ids.data());
  std::vector<Index> prev_rows(static_cast<std::size_t>(f.plan.n_rows()), -7);
  f.plan.link_sequences(sequence_of_token.data(), prev_rows.data());
  // Expert 0 rows: tokens 0, 1, 2 | 3, 4; expert 1: tokens 0, 1 | 4; expert 2: token 3.
  REQUIRE(prev_rows == std::vector<Index>{-1, 0, 1, -1, 3, -1, 5, -1, -1});
}
