// routers::NullExpertRouter (AdaMoE): hand-computed routing, all-null tokens, one projection vs two,
// routing invariants, ties, non-finite input, gradients (G1) and bad configurations.

#include <cmath>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/routers/null_experts.hpp>

#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::NullExpertOptions;
using moe::routers::NullExpertRouter;

namespace {

moe::MoEConfig shape(Index d, Index n, Index k) { return {.d_model = d, .d_ff = 1, .n_experts = n, .top_k = k}; }

// n true and m null experts whose logits are the token row (d = n + m).
NullExpertRouter<double> identity_router(Index n, Index m, Index k) {
  NullExpertRouter<double> r(shape(n + m, n, k), {.n_null_experts = m});
  moe::test::set_identity(r.gate());
  auto null_gate = r.null_gate();
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n + m; ++j) null_gate(i, j) = j == n + i ? 1.0 : 0.0;
  return r;
}

}  // namespace

TEST_CASE("NullExpertRouter reproduces AdaMoE's routing by hand", "[router]") {
  // n = 4 true, m = 4 null, top-3. z = (2, 0.5, 1, -1 | 1.5, 0, -2, 0.2): p over all 8; the top-3 are
  // expert 0, null 0 (id 4), expert 2: ids (0, -1, 2), true weights renormalised among themselves.
  const auto router = identity_router(4, 4, 3);
  RowMatrix<double> x(2, 8);
  x.row(0) << 2, 0.5, 1, -1, 1.5, 0, -2, 0.2;
  x.row(1) << -1, -2, -1.5, -3, 2, 1, 1.5, 0;  // the nulls win: no true expert
  const auto r = moe::test::route(router, x);
  REQUIRE(r.id(0, 0) == 0);
  REQUIRE(r.id(0, 1) == -1);
  REQUIRE(r.id(0, 2) == 2);
  const double e2 = std::exp(2.0), e1 = std::exp(1.0);
  CHECK(r.weight(0, 0) == Approx(e2 / (e2 + e1)).epsilon(1e-14));
  CHECK(r.weight(0, 1) == 0.0);
  CHECK(r.weight(0, 2) == Approx(e1 / (e2 + e1)).epsilon(1e-14));
  for (Index s = 0; s < 3; ++s) {
    CHECK(r.id(1, s) == -1);
    CHECK(r.weight(1, s) == 0.0);
  }
  std::vector<Index> counts(2);
  router.true_experts_per_token(r.ids, counts);
  REQUIRE(counts == std::vector<Index>{2, 0});
  // saved holds the probabilities over all 8.
  double sum = 0;
  for (Index e = 0; e < 8; ++e) sum += r.out.saved.probabilities[e];
  CHECK(sum == Approx(1.0).epsilon(1e-15));
}

TEST_CASE("NullExpertRouter: one gate over n + m rows equals a gate plus a null projection", "[router]") {
  moe::test::Rng rng(4);
  NullExpertRouter<float> two(shape(12, 8, 3), {.n_null_experts = 8});
  NullExpertRouter<float> one(shape(12, 8, 3), {.n_null_experts = 8, .separate_null_projection = false});
  two.init(rng);
  std::copy_n(two.gate().data(), 8 * 12, one.gate().data());
  std::copy_n(two.null_gate().data(), 8 * 12, one.gate().data() + 8 * 12);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 40, 12);
  const auto a = moe::test::route(one, x), b = moe::test::route(two, x);
  REQUIRE(a.ids == b.ids);
  REQUIRE(a.weights == b.weights);
  std::vector<std::string> names;
  one.visit_parameters([&](std::string_view n, moe::Parameter<float>&) { names.emplace_back(n); });
  two.visit_parameters([&](std::string_view n, moe::Parameter<float>&) { names.emplace_back(n); });
  REQUIRE(names == std::vector<std::string>{"gate", "gate", "null_gate"});
  REQUIRE_THROWS_WITH(one.null_gate(), Catch::Contains("separate_null_projection"));
}

TEST_CASE("NullExpertRouter routing invariants, ties and non-finite input", "[router]") {
  moe::test::Rng rng(12);
  const Index d = 10;
  Index true_slots = 0, null_slots = 0;
  for (const Index n : {1, 2, 3, 8, 64, 256}) {
    for (const Index m : {Index{1}, n}) {
      for (const Index k : {Index{1}, std::min<Index>(n + m, 3), std::min<Index>(n + m, 8)}) {
        INFO("n=" << n << " m=" << m << " k=" << k);
        NullExpertRouter<float> router(shape(d, n, k), {.n_null_experts = m});
        router.init(rng);
        const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 130, d, 3.0);
        for (Index T = 0; T <= 130; ++T) {
          const auto r = moe::test::route(router, moe::ConstMatrixView<float>(x).middle_rows(0, T));
          moe::test::check_invariants(r, n, {.unused_allowed = true});
          for (Index i : r.ids) (i >= 0 ? true_slots : null_slots) += 1;
        }
      }
    }
  }
  REQUIRE(true_slots > 1000);
  REQUIRE(null_slots > 1000);

  // Ties: all logits equal, the lowest ids win: true experts 0 and 1 before any null.
  auto tied = identity_router(3, 3, 2);
  auto r = moe::test::route(tied, RowMatrix<double>(RowMatrix<double>::Zero(1, 6)));
  REQUIRE(r.id(0, 0) == 0);
  REQUIRE(r.id(0, 1) == 1);
  // A NaN token: no finite logit, the lowest ids with weight 0; the other tokens are untouched.
  RowMatrix<double> x = RowMatrix<double>::Ones(3, 6);
  x(0, 0) = 3;
  const auto clean = moe::test::route(tied, x);
  x(1, 4) = std::numeric_limits<double>::quiet_NaN();
  r = moe::test::route(tied, x);
  moe::test::check_invariants(r, 3, {.sums_to_one = false, .unused_allowed = true});
  CHECK(r.weight(1, 0) == 0.0);
  for (const Index t : {0, 2})
    for (Index s = 0; s < 2; ++s) {
      REQUIRE(r.id(t, s) == clean.id(t, s));
      REQUIRE(r.weight(t, s) == clean.weight(t, s));
    }
}

TEST_CASE("NullExpertRouter::route_backward matches central finite differences in double", "[router][grad]") {
  double worst = 0;
  for (const bool separate : {true, false}) {
    for (const Index k : {2, 3, 5}) {
      INFO("separate=" << separate << " k=" << k);
      const Index d = 7, n = 4, m = 3, n_tokens = 6;
      NullExpertRouter<double> router(shape(d, n, k), {.n_null_experts = m, .separate_null_projection = separate});
      moe::test::Rng rng(60 + static_cast<std::uint64_t>(k));
      router.init(rng);
      RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n_tokens, d, 3.0);
      Index nulls = 0;
      const auto stats = moe::test::check_router_gradient(router, x, 2, [&](const auto& r) {
        for (Index t = 0; t < r.n_tokens; ++t) {
          const auto p = moe::test::sorted_row(r.out.saved.probabilities, t, n + m);
          REQUIRE(p[static_cast<std::size_t>(k - 1)] - p[static_cast<std::size_t>(k)] >= 1e-3);
        }
        for (Index i : r.ids) nulls += i < 0 ? 1 : 0;
      });
      REQUIRE(nulls > 0);
      REQUIRE(stats.max_abs_dparam > 1e-3);
      worst = std::max(worst, stats.max_abs_error);
    }
  }
  WARN("NullExpertRouter: max |analytic - numeric| = " << worst);
}

// True experts chosen with probability 0 (the nulls take all the mass): their weights are the softmax of
// their logits (renormalisation in log space), in f32 and, with the gradient, in double.
TEST_CASE("NullExpertRouter renormalises in log space where the true experts' probabilities underflow", "[router]") {
  {
    NullExpertRouter<float> router(shape(5, 3, 4), {.n_null_experts = 2});
    moe::test::set_identity(router.gate());
    auto null_gate = router.null_gate();
    for (Index i = 0; i < 2; ++i)
      for (Index j = 0; j < 5; ++j) null_gate(i, j) = j == 3 + i ? 1.0f : 0.0f;
    RowMatrix<float> x(1, 5);
    x << -110, -111, -113, 0, 0.5f;  // p of the true experts is 0 in f32
    const auto r = moe::test::route(router, x);
    REQUIRE(r.id(0, 0) == -1);
    REQUIRE(r.id(0, 1) == -1);
    REQUIRE(r.id(0, 2) == 0);  // ties at 0: the lower ids
    REQUIRE(r.id(0, 3) == 1);
    const double w0 = 1 / (1 + std::exp(-1.0));  // softmax(-110, -111)
    CHECK(double(r.weight(0, 2)) == Approx(w0).epsilon(1e-6));
    CHECK(double(r.weight(0, 3)) == Approx(1 - w0).epsilon(1e-6));
  }
  auto router = identity_router(3, 2, 4);
  RowMatrix<double> x(2, 5);
  x << -800, -801, -803, 0, 0.5,  //
      0.2, 1.0, -0.3, 0.1, -0.5;
  const auto base = moe::test::route(router, x);
  REQUIRE(base.weight(0, 2) > 0.5);
  const auto stats = moe::test::check_router_gradient(router, x, 3, [](const auto&) {});
  REQUIRE(stats.max_abs_dx > 1e-3);  // not the constant 0 of underflowed weights
}

TEST_CASE("NullExpertRouter rejects a bad configuration with the field's name", "[router]") {
  REQUIRE_THROWS_WITH(NullExpertRouter<float>(shape(4, 4, 2), {.n_null_experts = -1}), Catch::Contains("options.n_null_experts"));
  REQUIRE_THROWS_WITH(NullExpertRouter<float>(shape(4, 4, 9), {.n_null_experts = 4}), Catch::Contains("top_k"));
  REQUIRE_THROWS_WITH(NullExpertRouter<float>(shape(4, 4, 0), {.n_null_experts = 4}), Catch::Contains("top_k"));
  REQUIRE_THROWS_WITH(NullExpertRouter<float>(shape(4, 0, 1), {.n_null_experts = 4}), Catch::Contains("n_experts"));
  REQUIRE_THROWS_WITH(NullExpertRouter<float>(shape(0, 4, 1), {.n_null_experts = 4}), Catch::Contains("d_model"));
  // top_k may exceed the true experts: that is the point of null experts.
  REQUIRE_NOTHROW(NullExpertRouter<float>(shape(4, 2, 4), {.n_null_experts = 4}));
}
