// Bad capacity factors (issue 12, bug 1): a factor too large for an Index used to reach a double -> Index
// conversion (undefined; in practice every slot dropped, or a SEGV under ASan). A huge factor now means "no
// limit"; NaN, ±inf, zero and negative factors are rejected with the field named.

#include <cfloat>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/moe_layer.hpp>
#include <moe/routers/capacity.hpp>
#include <moe/routers/expert_choice.hpp>
#include <moe/routers/top_k_router.hpp>

#include "support/random.hpp"
#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::CapacityLimited;
using moe::routers::ExpertChoiceRouter;
using moe::routers::TopKRouter;

namespace {

constexpr double k_nan = std::numeric_limits<double>::quiet_NaN();
constexpr double k_inf = std::numeric_limits<double>::infinity();

// Factors far above what an Index holds once multiplied by T·k / E: each used to be converted out of range.
const std::vector<double> k_huge = {1e300, DBL_MAX, 1e19, 9.3e18, 1e30};
// Factors the routers must reject.
const std::vector<double> k_bad = {k_nan, k_inf, -k_inf, 0.0, -0.0, -1.0, -1e300, -DBL_MIN};

moe::MoEConfig shape(Index d, Index E, Index k) { return {.d_model = d, .d_ff = 8, .n_experts = E, .top_k = k}; }

}  // namespace

TEST_CASE("CapacityLimited with a huge capacity factor drops nothing: y equals the uncapped layer", "[bad_input]") {
  const Index d = 16, E = 8, k = 2;
  moe::test::Rng rng(12);
  TopKRouter<float> inner(shape(d, E, k));
  inner.init(rng);
  moe::experts::SwiGLU<float> bank(shape(d, E, k));
  bank.init(rng);
  moe::MoELayer<TopKRouter<float>, moe::experts::SwiGLU<float>> uncapped(inner, bank);

  for (const double cf : k_huge) {
    INFO("capacity_factor = " << cf);
    using Capped = CapacityLimited<TopKRouter<float>>;
    moe::MoELayer<Capped, moe::experts::SwiGLU<float>> capped(Capped(inner, {.capacity_factor = cf}), bank);
    for (const Index T : {1, 7, 64}) {
      INFO("n_tokens = " << T);
      CHECK(capped.router().capacity(T) == T);
      const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, T, d);
      RowMatrix<float> y(T, d), y_ref(T, d);
      const auto r = capped.forward(x, y);
      const auto r_ref = uncapped.forward(x, y_ref);
      REQUIRE(r.dropped_slots == 0);
      REQUIRE(std::vector<Index>(r.expert_ids.begin(), r.expert_ids.end()) ==
              std::vector<Index>(r_ref.expert_ids.begin(), r_ref.expert_ids.end()));
      REQUIRE((y.array() != 0.0f).any());
      REQUIRE(y == y_ref);
    }
  }
}

TEST_CASE("CapacityLimited rejects NaN, infinite, zero and negative capacity factors, naming the field",
          "[bad_input]") {
  const TopKRouter<float> inner(shape(4, 8, 2));
  for (const double cf : k_bad) {
    INFO("capacity_factor = " << cf);
    REQUIRE_THROWS_AS(CapacityLimited<TopKRouter<float>>(inner, {.capacity_factor = cf}), moe::Error);
    REQUIRE_THROWS_WITH(CapacityLimited<TopKRouter<float>>(inner, {.capacity_factor = cf}),
                        Catch::Contains("moe::routers::CapacityLimited") && Catch::Contains("options.capacity_factor"));
  }
  // The smallest positive factors are valid: one slot per expert.
  for (const double cf : {DBL_MIN, std::numeric_limits<double>::denorm_min()}) {
    const CapacityLimited<TopKRouter<float>> router(inner, {.capacity_factor = cf});
    REQUIRE(router.capacity(10) == 1);
    REQUIRE(router.capacity(0) == 0);
  }
}

TEST_CASE("ExpertChoiceRouter with a huge capacity factor: every expert takes every token", "[bad_input]") {
  const Index d = 8, E = 4, T = 13;
  moe::test::Rng rng(5);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, T, d);
  // capacity_factor = E already gives c = T: the routing a huge factor must reproduce, bit for bit.
  ExpertChoiceRouter<float> full(shape(d, E, 1), {.capacity_factor = static_cast<double>(E)});
  moe::Rng init(3);
  full.init(init);
  const auto expected = moe::test::route(full, x);
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) REQUIRE(expected.id(t, e) == e);
  for (const double cf : k_huge) {
    INFO("capacity_factor = " << cf);
    ExpertChoiceRouter<float> router(shape(d, E, 1), {.capacity_factor = cf});
    moe::Rng same(3);
    router.init(same);
    CHECK(router.capacity(T) == T);
    CHECK(router.capacity(1) == 1);
    const auto r = moe::test::route(router, x);
    REQUIRE(r.ids == expected.ids);
    REQUIRE(r.weights == expected.weights);
  }
}

TEST_CASE("ExpertChoiceRouter rejects NaN, infinite, zero and negative capacity factors, naming the field",
          "[bad_input]") {
  for (const double cf : k_bad) {
    INFO("capacity_factor = " << cf);
    REQUIRE_THROWS_WITH(ExpertChoiceRouter<float>(shape(4, 4, 1), {.capacity_factor = cf}),
                        Catch::Contains("moe::routers::ExpertChoiceRouter") &&
                            Catch::Contains("options.capacity_factor"));
  }
  const ExpertChoiceRouter<float> tiny(shape(4, 4, 1), {.capacity_factor = std::numeric_limits<double>::denorm_min()});
  REQUIRE(tiny.capacity(10) == 1);
}
