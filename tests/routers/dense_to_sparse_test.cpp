// routers::DenseToSparseGate (EvoMoE): the threshold rule by hand, the τ schedules, sparsification as τ
// decays, the hard switch, evaluation, invariants, non-finite input, gradients (G1) and bad configurations.

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/routers/dense_to_sparse.hpp>
#include <moe/routing_plan.hpp>

#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::DenseToSparseGate;
using moe::routers::DenseToSparseOptions;
using moe::routers::TemperatureDecay;

namespace {

moe::MoEConfig shape(Index d, Index E, Index k) { return {.d_model = d, .d_ff = 1, .n_experts = E, .top_k = k}; }

std::vector<double> softmax(std::vector<double> z) {
  double max = *std::max_element(z.begin(), z.end()), sum = 0;
  for (auto& v : z) sum += (v = std::exp(v - max));
  for (auto& v : z) v /= sum;
  return z;
}

}  // namespace

TEST_CASE("DenseToSparseGate: experts with G > threshold, by hand from the Gumbel counter", "[router]") {
  const Index E = 6;
  const DenseToSparseOptions o{.threshold = 0.05, .max_temperature = 0.5, .decay = TemperatureDecay::constant, .seed = 77};
  DenseToSparseGate<double> router(shape(E, E, E), o);
  moe::test::set_identity(router.gate());
  router.set_step(4);
  RowMatrix<double> x(2, E);
  x.row(0) << 1.0, 0.2, -0.5, 0.9, -3.0, 0.4;
  x.row(1) << 0.0, 0.0, 0.0, 0.0, 0.0, 0.0;
  const auto r = moe::test::route(router, x);
  for (Index t = 0; t < 2; ++t) {
    std::vector<double> z(x.row(t).data(), x.row(t).data() + E), y(z.size());
    for (Index e = 0; e < E; ++e)
      y[static_cast<std::size_t>(e)] = (z[static_cast<std::size_t>(e)] + moe::routers::detail::counter_gumbel(77, 4, t, e)) / 0.5;
    const auto g = softmax(y), p = softmax(z);
    std::vector<Index> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return g[static_cast<std::size_t>(a)] > g[static_cast<std::size_t>(b)]; });
    Index s = 0;
    for (Index e : order) {
      if (g[static_cast<std::size_t>(e)] <= 0.05) break;
      INFO("token " << t << " slot " << s);
      REQUIRE(r.id(t, s) == e);
      CHECK(r.weight(t, s) == Approx(p[static_cast<std::size_t>(e)]).epsilon(1e-13));
      ++s;
    }
    REQUIRE(s >= 1);
    REQUIRE(s < E);  // the threshold did cut
    for (; s < E; ++s) {
      REQUIRE(r.id(t, s) == -1);
      REQUIRE(r.weight(t, s) == 0.0);
    }
  }
}

TEST_CASE("DenseToSparseGate temperature schedules", "[router]") {
  DenseToSparseOptions o{.max_temperature = 2.0, .min_temperature = 0.5, .decay_steps = 100};
  using G = DenseToSparseGate<float>;
  CHECK(G::temperature_at(o, 0) == 2.0);
  CHECK(G::temperature_at(o, 50) == Approx(1.0).epsilon(1e-15));  // 2 · (1/4)^(1/2)
  CHECK(G::temperature_at(o, 100) == Approx(0.5).epsilon(1e-15));
  CHECK(G::temperature_at(o, 1000) == 0.5);
  o.decay = TemperatureDecay::linear;
  CHECK(G::temperature_at(o, 50) == Approx(1.25).epsilon(1e-15));
  CHECK(G::temperature_at(o, 100) == 0.5);
  CHECK(G::temperature_at(o, 101) == 0.5);
  o.decay = TemperatureDecay::constant;
  CHECK(G::temperature_at(o, 100) == 2.0);
}

TEST_CASE("DenseToSparseGate sparsifies as τ decays, then switches to top-1; evaluation is top-1", "[router]") {
  const Index d = 16, E = 16, n_tokens = 200;
  DenseToSparseGate<float> router(shape(d, E, E), {.max_temperature = 2.0, .min_temperature = 0.1, .decay_steps = 1000,
                                                  .hard_switch_step = 3000, .seed = 1});
  moe::test::Rng rng(2);
  router.init(rng);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, d);
  double previous = static_cast<double>(E) + 1;
  std::vector<Index> active(static_cast<std::size_t>(n_tokens));
  for (const std::uint64_t step : {0, 250, 500, 1000, 2000, 3000}) {
    router.set_step(step);
    const auto r = moe::test::route(router, x);
    moe::test::check_invariants(r, E, {.sums_to_one = false, .unused_allowed = true});
    moe::count_active_slots(r.ids.data(), n_tokens, E, active.data());
    const double mean = static_cast<double>(std::accumulate(active.begin(), active.end(), Index{0})) / n_tokens;
    INFO("step " << step << " tau " << router.temperature() << " mean active " << mean);
    if (step == 0) REQUIRE(mean > 0.75 * E);  // dense at the start
    if (step < 3000) REQUIRE(mean < previous);
    if (step == 3000) {
      REQUIRE(router.hard());
      for (Index a : active) REQUIRE(a == 1);
    }
    previous = mean;
  }
  router.set_training(false);
  const auto r = moe::test::route(router, x);
  moe::count_active_slots(r.ids.data(), n_tokens, E, active.data());
  for (Index a : active) REQUIRE(a == 1);
  for (Index t = 0; t < n_tokens; ++t) {  // argmax of the clean logits, weight p
    const auto p = moe::test::sorted_row(r.out.saved.probabilities, t, E);
    REQUIRE(r.weight(t, 0) == static_cast<float>(p[0]));
  }
}

TEST_CASE("DenseToSparseGate: invariants over shapes, reproducible noise, non-finite input", "[router]") {
  moe::test::Rng rng(5);
  const Index d = 8;
  for (const Index E : {1, 2, 3, 8, 64, 256}) {
    for (const Index k : {Index{1}, std::min<Index>(E, 8), E}) {
      DenseToSparseGate<float> router(shape(d, E, k), {.seed = 3});
      router.init(rng);
      const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 130, d, 2.0);
      for (Index T = 0; T <= 130; ++T) {
        INFO("E=" << E << " k=" << k << " T=" << T);
        const auto r = moe::test::route(router, moe::ConstMatrixView<float>(x).middle_rows(0, T));
        moe::test::check_invariants(r, E, {.sums_to_one = false, .unused_allowed = true});
        for (Index t = 0; t < T; ++t) REQUIRE(r.id(t, 0) >= 0);  // the top G is >= 1/E > γ
      }
      REQUIRE(moe::test::route(router, x).weights == moe::test::route(router, x).weights);
    }
  }
  DenseToSparseGate<double> router(shape(4, 8, 8), {});
  router.init(rng);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 3, 4);
  const auto clean = moe::test::route(router, x);
  x(1, 2) = std::numeric_limits<double>::quiet_NaN();
  const auto r = moe::test::route(router, x);
  moe::test::check_invariants(r, 8, {.sums_to_one = false, .unused_allowed = true});
  for (Index s = 0; s < 8; ++s) {
    CHECK(r.weight(1, s) == 0.0);
    for (const Index t : {0, 2}) {
      REQUIRE(r.id(t, s) == clean.id(t, s));
      REQUIRE(r.weight(t, s) == clean.weight(t, s));
    }
  }
}

TEST_CASE("DenseToSparseGate::route_backward matches central finite differences in double", "[router][grad]") {
  double worst = 0;
  for (const bool gumbel_gates : {false, true}) {
    for (const bool training : {true, false}) {
      INFO("gumbel_gates=" << gumbel_gates << " training=" << training);
      const Index d = 5, E = 4, n_tokens = 5;
      DenseToSparseGate<double> router(shape(d, E, 3), {.threshold = 0.02, .max_temperature = 0.8, .min_temperature = 0.3,
                                                        .decay_steps = 10, .use_gumbel_gates = gumbel_gates, .seed = 4});
      router.set_step(3);
      router.set_training(training);
      moe::test::Rng rng(9);
      router.init(rng);
      RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n_tokens, d, 2.0);
      Index unused = 0;
      const auto stats = moe::test::check_router_gradient(router, x, 3, [&](const auto& r) {
        for (Index i : r.ids) unused += i < 0 ? 1 : 0;
      });
      if (training) REQUIRE(unused > 0);
      REQUIRE(stats.max_abs_dparam > 1e-3);
      worst = std::max(worst, stats.max_abs_error);
    }
  }
  WARN("DenseToSparseGate: max |analytic - numeric| = " << worst);
}

TEST_CASE("DenseToSparseGate rejects a bad configuration with the field's name", "[router]") {
  const auto bad = [](const DenseToSparseOptions& o, const char* field) {
    INFO(field);
    REQUIRE_THROWS_WITH(DenseToSparseGate<float>(shape(4, 8, 8), o), Catch::Contains(field));
  };
  bad({.threshold = 0}, "options.threshold");
  bad({.threshold = 1}, "options.threshold");
  bad({.max_temperature = 0}, "options.max_temperature");
  bad({.min_temperature = -1}, "options.min_temperature");
  bad({.max_temperature = 0.5, .min_temperature = 1.0}, "options.min_temperature");
  bad({.decay_steps = 0}, "options.decay_steps");
  bad({.hard_switch_step = -2}, "options.hard_switch_step");
  REQUIRE_THROWS_WITH(DenseToSparseGate<float>(shape(4, 8, 9), {}), Catch::Contains("top_k"));
}
