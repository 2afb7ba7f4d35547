// routers::CapacityLimited: the dropped count and kept set against a brute force (RELIABILITY I3), both
// drop policies, gradients through dropping (G1), a layer run where dropped slots contribute nothing, and
// bad configurations.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/experts/zero_computation.hpp>
#include <moe/moe_layer.hpp>
#include <moe/routers/capacity.hpp>
#include <moe/routers/top_k_router.hpp>

#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::CapacityLimited;
using moe::routers::CapacityOptions;
using moe::routers::DropPolicy;
using moe::routers::TopKRouter;

namespace {

moe::MoEConfig shape(Index d, Index E, Index k) { return {.d_model = d, .d_ff = 4, .n_experts = E, .top_k = k}; }

// Expected routing after capacity, by brute force from the inner router's routing: per expert, its slots
// in token order, ranked by the policy, the first C kept.
template <class R>
moe::test::Routing<R> brute_force(moe::test::Routing<R> r, Index E, Index C, DropPolicy policy, Index& dropped) {
  using T = typename R::Scalar;
  dropped = 0;
  for (Index e = 0; e < E; ++e) {
    std::vector<Index> slots;
    for (Index i = 0; i < r.n_tokens * r.slots; ++i)
      if (r.ids[static_cast<std::size_t>(i)] == e) slots.push_back(i);
    if (policy == DropPolicy::probability)
      std::stable_sort(slots.begin(), slots.end(), [&](Index a, Index b) {
        return r.weights[static_cast<std::size_t>(a)] > r.weights[static_cast<std::size_t>(b)];
      });
    for (std::size_t j = static_cast<std::size_t>(C); j < slots.size(); ++j) {
      r.ids[static_cast<std::size_t>(slots[j])] = -1;
      r.weights[static_cast<std::size_t>(slots[j])] = T(0);
      ++dropped;
    }
  }
  return r;
}

}  // namespace

TEST_CASE("CapacityLimited drops exactly what a brute force drops, for both policies", "[router]") {
  moe::test::Rng rng(17);
  const Index d = 8;
  Index total_dropped = 0;
  for (const Index E : {1, 8, 64}) {
    for (const Index k : {1, 2, 4}) {
      if (k > E) continue;
      TopKRouter<float> inner(shape(d, E, k));
      inner.init(rng);
      for (Index j = 0; j < d; ++j) inner.gate()(0, j) += 0.8f;  // skew: expert 0 is popular
      for (const double cf : {1e9, 2.0, 1.25, 1.0, 0.5, 1.0 / static_cast<double>(k) - 1e-3}) {
        for (const DropPolicy policy : {DropPolicy::probability, DropPolicy::position}) {
          const CapacityLimited<TopKRouter<float>> router(inner, {.capacity_factor = cf, .drop_policy = policy});
          for (Index T = 0; T <= 130; ++T) {
            INFO("E=" << E << " k=" << k << " cf=" << cf << " policy=" << static_cast<int>(policy) << " T=" << T);
            const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, T, d);
            const Index C = std::min(  // an expert never has more than T slots to keep
                T, static_cast<Index>(std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * cf)));
            REQUIRE(router.capacity(T) == C);
            const auto r = moe::test::route(router, x);
            Index expected_dropped = 0;
            const auto expected = brute_force(moe::test::route(inner, x), E, C, policy, expected_dropped);
            REQUIRE(r.out.dropped_slots == expected_dropped);
            REQUIRE(r.ids == expected.ids);
            REQUIRE(r.weights == expected.weights);
            moe::test::check_invariants(r, E, {.sums_to_one = false, .unused_allowed = true});
            std::vector<Index> active(static_cast<std::size_t>(T));
            moe::count_active_slots(r.ids.data(), T, k, active.data());
            Index kept = 0;
            for (Index a : active) kept += a;
            REQUIRE(kept + r.out.dropped_slots == T * k);
            total_dropped += r.out.dropped_slots;
          }
        }
      }
    }
  }
  REQUIRE(total_dropped > 1000);  // the sweep does drop
}

TEST_CASE("CapacityLimited::route_backward matches central finite differences through dropped slots",
          "[router][grad]") {
  double worst = 0;
  for (const DropPolicy policy : {DropPolicy::probability, DropPolicy::position}) {
    for (const bool renormalize : {true, false}) {
      const Index d = 5, E = 4, k = 2, n_tokens = 8;
      TopKRouter<double> inner(shape(d, E, k), {.renormalize = renormalize});
      moe::test::Rng rng(3);
      inner.init(rng);
      CapacityLimited<TopKRouter<double>> router(inner, {.capacity_factor = 0.75, .drop_policy = policy});
      RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n_tokens, d, 3.0);
      Index dropped = 0;
      const auto stats = moe::test::check_router_gradient(router, x, 5, [&](const auto& r) {
        for (Index i : r.ids) dropped += i < 0 ? 1 : 0;
      });
      INFO("policy " << static_cast<int>(policy) << " renormalize " << renormalize);
      REQUIRE(dropped > 0);
      REQUIRE(stats.max_abs_dparam > 1e-3);
      worst = std::max(worst, stats.max_abs_error);
    }
  }
  WARN("CapacityLimited: max |analytic - numeric| = " << worst);
}

TEST_CASE("CapacityLimited in a layer: a token whose slots are all dropped gets 0", "[router][layer]") {
  const Index d = 6, E = 4, k = 1, n_tokens = 12;
  TopKRouter<float> inner(shape(d, E, k));
  for (Index j = 0; j < d; ++j) inner.gate()(2, j) = 5;  // every token picks expert 2
  moe::MoELayer<CapacityLimited<TopKRouter<float>>, moe::experts::SwiGLU<float>> layer(
      CapacityLimited<TopKRouter<float>>(inner, {.capacity_factor = 1.0, .drop_policy = DropPolicy::position}),
      moe::experts::SwiGLU<float>(shape(d, E, k)));
  moe::Rng rng(1);
  layer.bank<0>().init(rng);
  const RowMatrix<float> x = RowMatrix<float>::Ones(n_tokens, d);
  RowMatrix<float> y(n_tokens, d);
  const auto result = layer.forward(x, y);
  const Index C = layer.router().capacity(n_tokens);  // ceil(12 / 4) = 3
  REQUIRE(C == 3);
  for (Index t = 0; t < n_tokens; ++t) {
    INFO("token " << t);
    REQUIRE(result.expert_ids[static_cast<std::size_t>(t)] == (t < C ? 2 : -1));
    if (t >= C) REQUIRE((y.row(t).array() == 0.0f).all());
    else REQUIRE((y.row(t).array() != 0.0f).any());
  }
}

TEST_CASE("CapacityLimited with MoE++'s heterogeneous capacity (Eq. 8): FFN experts take τ times the share",
          "[router][layer][moepp]") {
  // E = 4: 2 FFN experts, then a copy and a zero expert (zero-computation). T = 10 tokens, k = 2, γ = 1.1, τ = 0.75:
  // τ·N_FFN + N_ZC = 3.5, C_FFN = ceil(20 / 3.5 · 1.1 · 0.75) = ceil(4.71) = 5, C_ZC = ceil(20 / 3.5 · 1.1) = 7
  // (Σ C = 24 ≥ γ·T·k = 22); with τ = 1 every expert gets ceil(20 / 4 · 1.1) = 6.
  const Index d = 6, E = 4, k = 2, n_tokens = 10;
  using Layer = moe::MoELayer<CapacityLimited<TopKRouter<float>>, moe::experts::SwiGLU<float>,
                              moe::experts::CopyExperts<float>, moe::experts::ZeroExperts<float>>;
  for (const double tau : {0.75, 1.0}) {
    INFO("tau " << tau);
    TopKRouter<float> inner(shape(d, E, k));
    for (Index j = 0; j < d; ++j) {  // every token picks expert 0 (FFN) first, then expert 2 (copy)
      inner.gate()(0, j) = 5;
      inner.gate()(2, j) = 3;
    }
    Layer layer(CapacityLimited<TopKRouter<float>>(
                    inner, {.capacity_factor = 1.1, .drop_policy = DropPolicy::position, .heterogeneous_tau = tau}),
                moe::experts::SwiGLU<float>(shape(d, 2, k)), moe::experts::CopyExperts<float>(1, d),
                moe::experts::ZeroExperts<float>(1, d));
    const Index c_ffn = tau < 1 ? 5 : 6, c_zc = tau < 1 ? 7 : 6;
    CHECK(layer.router().capacity(n_tokens, false, 2) == c_ffn);
    CHECK(layer.router().capacity(n_tokens, true, 2) == c_zc);
    const RowMatrix<float> x = RowMatrix<float>::Ones(n_tokens, d);
    RowMatrix<float> y(n_tokens, d);
    const auto result = layer.forward(x, y);
    for (Index t = 0; t < n_tokens; ++t) {
      INFO("token " << t);
      CHECK(result.expert_ids[static_cast<std::size_t>(t * k)] == (t < c_ffn ? 0 : -1));
      CHECK(result.expert_ids[static_cast<std::size_t>(t * k + 1)] == (t < c_zc ? 2 : -1));
    }
    CHECK(result.dropped_slots == (n_tokens - c_ffn) + (n_tokens - c_zc));
  }
}

TEST_CASE("CapacityLimited rejects a bad capacity factor with the field's name", "[router]") {
  TopKRouter<float> inner(shape(4, 8, 2));
  for (const double cf : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    REQUIRE_THROWS_AS(CapacityLimited<TopKRouter<float>>(inner, {.capacity_factor = cf}), moe::Error);
    REQUIRE_THROWS_WITH(CapacityLimited<TopKRouter<float>>(inner, {.capacity_factor = cf}),
                        Catch::Contains("options.capacity_factor"));
  }
}
