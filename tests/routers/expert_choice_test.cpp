// routers::ExpertChoiceRouter: routing by hand, perfect balance, ties, non-causality, invariants,
// non-finite input, gradients (G1) and bad configurations.

#include <cmath>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/routers/expert_choice.hpp>

#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::ExpertChoiceRouter;

namespace {

moe::MoEConfig shape(Index d, Index E) { return {.d_model = d, .d_ff = 1, .n_experts = E, .top_k = 1}; }

}  // namespace

TEST_CASE("ExpertChoiceRouter: each expert takes its top-c tokens (by hand)", "[router]") {
  // T = 4, E = 2, capacity factor 1: c = ceil(4 / 2) = 2. With logits (a, 0), S[t, 0] = σ(a) and
  // S[t, 1] = 1 - σ(a): expert 0 takes the two largest a, expert 1 the two smallest.
  ExpertChoiceRouter<double> router(shape(2, 2), {.capacity_factor = 1.0});
  moe::test::set_identity(router.gate());
  RowMatrix<double> x(4, 2);
  x << 0.5, 0, -1, 0, 2, 0, 0.1, 0;
  const auto r = moe::test::route(router, x);
  REQUIRE(router.capacity(4) == 2);
  const auto sig = [](double a) { return 1 / (1 + std::exp(-a)); };
  // Expert 0: tokens 2 (a = 2) and 0 (0.5); expert 1: tokens 1 (-1) and 3 (0.1).
  const std::vector<Index> expected = {0, -1, -1, 1, 0, -1, -1, 1};
  REQUIRE(r.ids == expected);
  CHECK(r.weight(0, 0) == Approx(sig(0.5)).epsilon(1e-14));
  CHECK(r.weight(1, 1) == Approx(1 - sig(-1)).epsilon(1e-14));
  CHECK(r.weight(2, 0) == Approx(sig(2)).epsilon(1e-14));
  CHECK(r.weight(3, 1) == Approx(1 - sig(0.1)).epsilon(1e-14));
}

TEST_CASE("ExpertChoiceRouter: perfect balance, ties to the lower token, and it is not causal", "[router]") {
  moe::test::Rng rng(21);
  const Index d = 8;
  for (const Index E : {1, 2, 3, 8, 64, 256}) {
    for (const double cf : {0.5, 1.0, 2.0}) {
      ExpertChoiceRouter<float> router(shape(d, E), {.capacity_factor = cf});
      router.init(rng);
      const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 130, d, 2.0);
      for (Index T = 0; T <= 130; ++T) {
        INFO("E=" << E << " cf=" << cf << " T=" << T);
        const auto r = moe::test::route(router, moe::ConstMatrixView<float>(x).middle_rows(0, T));
        moe::test::check_invariants(r, E, {.sums_to_one = false, .unused_allowed = true});
        std::vector<Index> per_expert(static_cast<std::size_t>(E));
        bool slot_is_expert = true;  // slot e holds e or -1
        for (Index t = 0; t < T; ++t)
          for (Index e = 0; e < E; ++e) {
            slot_is_expert = slot_is_expert && (r.id(t, e) == e || r.id(t, e) == -1);
            if (r.id(t, e) == e) ++per_expert[static_cast<std::size_t>(e)];
          }
        REQUIRE(slot_is_expert);
        for (Index n : per_expert) REQUIRE(n == router.capacity(T));
      }
    }
  }
  // Equal tokens: the lower tokens win.
  ExpertChoiceRouter<float> router(shape(4, 2), {.capacity_factor = 1.0});
  router.init(rng);
  const auto r = moe::test::route(router, RowMatrix<float>(RowMatrix<float>::Ones(6, 4)));
  for (Index t = 0; t < 6; ++t)
    for (Index e = 0; e < 2; ++e) REQUIRE(r.id(t, e) == (t < 3 ? e : -1));
  // Non-causal: appending tokens that expert 0 prefers pushes token 0 out of expert 0.
  ExpertChoiceRouter<double> two(shape(2, 2), {.capacity_factor = 1.0});
  moe::test::set_identity(two.gate());
  RowMatrix<double> short_batch(2, 2), long_batch(4, 2);
  short_batch << 1, 0, -1, 0;
  long_batch << 1, 0, -1, 0, 3, 0, 4, 0;
  REQUIRE(moe::test::route(two, short_batch).id(0, 0) == 0);
  REQUIRE(moe::test::route(two, long_batch).id(0, 0) == -1);
}

TEST_CASE("ExpertChoiceRouter: a token without a finite logit ranks last and gets weight 0", "[router]") {
  ExpertChoiceRouter<double> router(shape(4, 4), {.capacity_factor = 1.0});
  moe::test::Rng rng(2);
  router.init(rng);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 8, 4);
  const auto clean = moe::test::route(router, x);
  for (Index e = 0; e < 4; ++e) x(5, e) = std::numeric_limits<double>::quiet_NaN();
  const auto r = moe::test::route(router, x);
  moe::test::check_invariants(r, 4, {.sums_to_one = false, .unused_allowed = true});
  for (Index e = 0; e < 4; ++e) {
    CHECK(r.id(5, e) == -1);
    CHECK(r.weight(5, e) == 0.0);
  }
  // c = 2 of 7 good tokens: the others keep their routing unless token 5 held one of their places.
  for (Index t = 0; t < 8; ++t)
    for (Index e = 0; e < 4; ++e)
      if (t != 5 && clean.id(5, e) != e) {
        REQUIRE(r.id(t, e) == clean.id(t, e));
        REQUIRE(r.weight(t, e) == clean.weight(t, e));
      }
}

TEST_CASE("ExpertChoiceRouter::route_backward matches central finite differences in double", "[router][grad]") {
  double worst = 0;
  for (const double cf : {1.0, 2.0}) {
    const Index d = 5, E = 4, n_tokens = 7;
    ExpertChoiceRouter<double> router(shape(d, E), {.capacity_factor = cf});
    moe::test::Rng rng(31);
    router.init(rng);
    RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n_tokens, d, 3.0);
    const Index c = router.capacity(n_tokens);
    const auto stats = moe::test::check_router_gradient(router, x, 8, [&](const auto& r) {
      for (Index e = 0; e < E; ++e) {  // each expert's c-th and (c+1)-th tokens differ by >= 1e-3
        std::vector<double> column;
        for (Index t = 0; t < n_tokens; ++t) column.push_back(r.out.saved.scores[t * E + e]);
        std::sort(column.begin(), column.end(), std::greater<>());
        if (c < n_tokens)
          REQUIRE(column[static_cast<std::size_t>(c - 1)] - column[static_cast<std::size_t>(c)] >= 1e-3);
      }
    });
    REQUIRE(stats.max_abs_dparam > 1e-3);
    worst = std::max(worst, stats.max_abs_error);
  }
  WARN("ExpertChoiceRouter: max |analytic - numeric| = " << worst);
}

TEST_CASE("ExpertChoiceRouter rejects a bad capacity factor with the field's name", "[router]") {
  for (const double cf : {0.0, -2.0, std::numeric_limits<double>::quiet_NaN()})
    REQUIRE_THROWS_WITH(ExpertChoiceRouter<float>(shape(4, 4), {.capacity_factor = cf}),
                        Catch::Contains("options.capacity_factor"));
  REQUIRE_THROWS_WITH(ExpertChoiceRouter<float>(shape(4, 0)), Catch::Contains("n_experts"));
}
