// routers::TopKRouter: published numerics of each preset (tables computed by hand from PAPERS.md A.1),
// every knob, ties, non-finite logits, routing invariants (RELIABILITY I1), gradients (G1), noise
// reproducibility and bad configurations (B2).

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/detail/parallel.hpp>
#include <moe/routers/top_k_router.hpp>
#include <moe/routers/top_k_softmax.hpp>

#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::ScoreFunction;
using moe::routers::TopKOptions;
using moe::routers::TopKRouter;
namespace presets = moe::routers::presets;

namespace {

moe::MoEConfig shape(Index d, Index E, Index k) { return {.d_model = d, .d_ff = 1, .n_experts = E, .top_k = k}; }

// A router over E experts whose gate is the identity: the logits are the token row.
TopKRouter<double> identity_router(Index E, Index k, const TopKOptions& o) {
  TopKRouter<double> r(shape(E, E, k), o);
  moe::test::set_identity(r.gate());
  return r;
}

RowMatrix<double> rows(std::initializer_list<std::initializer_list<double>> v) {
  RowMatrix<double> m(static_cast<Index>(v.size()), static_cast<Index>(v.begin()->size()));
  Index i = 0;
  for (const auto& r : v) {
    Index j = 0;
    for (double x : r) m(i, j++) = x;
    ++i;
  }
  return m;
}

double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }

std::vector<double> softmax(const std::vector<double>& z) {
  std::vector<double> p(z.size());
  double sum = 0;
  for (std::size_t i = 0; i < z.size(); ++i) sum += (p[i] = std::exp(z[i]));
  for (auto& v : p) v /= sum;
  return p;
}

void check_weights(const auto& r, Index t, const std::vector<double>& expected) {
  for (Index s = 0; s < r.slots; ++s) {
    INFO("slot " << s);
    CHECK(r.weight(t, s) == Approx(expected[static_cast<std::size_t>(s)]).epsilon(1e-14));
  }
}

std::vector<Index> ids_of(const auto& r, Index t) {
  return {r.ids.begin() + t * r.slots, r.ids.begin() + (t + 1) * r.slots};
}

// The keys TopKRouter chooses on, recomputed here from its saved scores, bias and groups (Gumbel noise
// included when on): asserts that the k-th and (k+1)-th eligible keys, and the kept and first dropped
// group, differ by >= 1e-3, so finite differences never flip the choice.
template <class R>
void assert_top_k_gaps(const R& router, const auto& r) {
  const auto& o = router.options();
  const Index E = router.n_experts(), k = router.top_k();
  for (Index t = 0; t < r.n_tokens; ++t) {
    std::vector<double> key(r.out.saved.scores + t * E, r.out.saved.scores + (t + 1) * E);
    REQUIRE(!(router.training() && o.gumbel_noise));  // Gumbel keys are checked by the probes only
    for (std::size_t e = 0; e < router.bias().size(); ++e) key[e] += router.bias()[e];
    std::vector<bool> eligible(static_cast<std::size_t>(E), true);
    if (o.n_groups > 1) {
      const Index size = E / o.n_groups;
      std::vector<double> group(static_cast<std::size_t>(o.n_groups));
      for (Index g = 0; g < o.n_groups; ++g) {
        std::vector<double> v(key.begin() + g * size, key.begin() + (g + 1) * size);
        std::sort(v.begin(), v.end(), std::greater<>());
        group[static_cast<std::size_t>(g)] = std::accumulate(v.begin(), v.begin() + o.group_score_top, 0.0);
      }
      std::vector<double> sorted = group;
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      const double cut = sorted[static_cast<std::size_t>(o.top_k_groups - 1)];
      if (o.top_k_groups < o.n_groups) REQUIRE(cut - sorted[static_cast<std::size_t>(o.top_k_groups)] >= 1e-3);
      for (Index e = 0; e < E; ++e) eligible[static_cast<std::size_t>(e)] = group[static_cast<std::size_t>(e / size)] >= cut;
    }
    std::vector<double> v;
    for (Index e = 0; e < E; ++e)
      if (eligible[static_cast<std::size_t>(e)]) v.push_back(key[static_cast<std::size_t>(e)]);
    std::sort(v.begin(), v.end(), std::greater<>());
    if (static_cast<Index>(v.size()) > k) REQUIRE(v[static_cast<std::size_t>(k - 1)] - v[static_cast<std::size_t>(k)] >= 1e-3);
  }
}

}  // namespace

TEST_CASE("TopKRouter presets reproduce the published numerics (hand tables)", "[router]") {
  SECTION("Switch: top-1 of softmax, weight p") {
    const auto r = moe::test::route(identity_router(4, 1, presets::switch_transformer()), rows({{1, 3, 2, 0}}));
    REQUIRE(ids_of(r, 0) == std::vector<Index>{1});
    check_weights(r, 0, {std::exp(3.0) / (std::exp(1.0) + std::exp(3.0) + std::exp(2.0) + 1.0)});
  }
  const std::vector<double> z8 = {0.5, -1, 2, 1.5, 0, 3, -2, 1};
  const auto x8 = rows({{0.5, -1, 2, 1.5, 0, 3, -2, 1}});
  SECTION("Mixtral: top-2 of softmax, renormalised = softmax over the two chosen logits") {
    const auto r = moe::test::route(identity_router(8, 2, presets::mixtral()), x8);
    REQUIRE(ids_of(r, 0) == std::vector<Index>{5, 2});
    const double a = std::exp(3.0), b = std::exp(2.0);
    check_weights(r, 0, {a / (a + b), b / (a + b)});
  }
  SECTION("Qwen2-MoE: top-4 of softmax, not renormalised") {
    const auto r = moe::test::route(identity_router(8, 4, presets::qwen2_moe()), x8);
    REQUIRE(ids_of(r, 0) == std::vector<Index>{5, 2, 3, 7});
    const auto p = softmax(z8);
    check_weights(r, 0, {p[5], p[2], p[3], p[7]});
  }
  SECTION("Qwen3-MoE: top-k of softmax, renormalised; OLMoE and DeepSeek-V2-Lite: not renormalised, no groups") {
    const auto q = moe::test::route(identity_router(8, 3, presets::qwen3_moe()), x8);
    REQUIRE(ids_of(q, 0) == std::vector<Index>{5, 2, 3});
    const auto p = softmax(z8);
    const double sum = p[5] + p[2] + p[3];
    check_weights(q, 0, {p[5] / sum, p[2] / sum, p[3] / sum});
    for (const auto& options : {presets::olmoe(), presets::deepseek_v2_lite()}) {
      const auto r = moe::test::route(identity_router(8, 3, options), x8);
      REQUIRE(ids_of(r, 0) == std::vector<Index>{5, 2, 3});
      check_weights(r, 0, {p[5], p[2], p[3]});
    }
  }
  SECTION("gpt-oss: top-k of the logits W x + b, weights = softmax over the chosen logits") {
    auto router = identity_router(8, 4, presets::gpt_oss());
    REQUIRE(router.gate_bias().cols() == 8);
    // Without the bias z = x: experts 5, 2, 3, 7. The bias lifts expert 4 (0 -> 2.5) above all but 5 and
    // lowers expert 2 (2 -> 0.5) out of the top-4: z = (0.5, -1, 0.5, 1.5, 2.5, 3, -2, 1).
    router.gate_bias()(0, 4) = 2.5;
    router.gate_bias()(0, 2) = -1.5;
    const auto r = moe::test::route(router, x8);
    REQUIRE(ids_of(r, 0) == std::vector<Index>{5, 4, 3, 7});
    const double sum = std::exp(3.0) + std::exp(2.5) + std::exp(1.5) + std::exp(1.0);
    check_weights(r, 0, {std::exp(3.0) / sum, std::exp(2.5) / sum, std::exp(1.5) / sum, std::exp(1.0) / sum});
  }
  SECTION("DeepSeek-V2: groups by max, keep 3 of 8, top-6, p x 16") {
    const std::vector<double> z = {0.1, 2.0, 1.5, 1.4, 0.3, 0.2, 1.8, -1, 0.0, 0.5, 1.9, 1.7, -0.5, 0.4, 1.0, 1.2};
    RowMatrix<double> x(1, 16);
    for (Index e = 0; e < 16; ++e) x(0, e) = z[static_cast<std::size_t>(e)];
    const auto r = moe::test::route(identity_router(16, 6, presets::deepseek_v2()), x);
    // Group maxima 2.0, 1.5, 0.3, 1.8, 0.5, 1.9, 0.4, 1.2: groups 0, 5, 3 stay, so experts 2 and 3
    // (1.5, 1.4) are out although they beat experts 0 and 7.
    REQUIRE(ids_of(r, 0) == std::vector<Index>{1, 10, 6, 11, 0, 7});
    const auto p = softmax(z);
    check_weights(r, 0, {16 * p[1], 16 * p[10], 16 * p[6], 16 * p[11], 16 * p[0], 16 * p[7]});
  }
  SECTION("DeepSeek-V3: sigmoid, bias chooses only, groups by top-2 sum, renormalised x 2.5") {
    const std::vector<double> z = {2, -1, 0, 0, 1, 1, -2, 3, 0.5, 0.5, -1, -1, 1.5, -0.5, 0.2, 0.1};
    RowMatrix<double> x(1, 16);
    for (Index e = 0; e < 16; ++e) x(0, e) = z[static_cast<std::size_t>(e)];
    auto router = identity_router(16, 4, presets::deepseek_v3());
    router.bias()[3] = 0.9;
    router.bias()[12] = -0.6;
    const auto r = moe::test::route(router, x);
    // Keys s + b: group sums 1.150, 1.900, 1.462, 1.072, 1.245, 0.538, 0.595, 1.075 keep groups 1, 2, 4, 0, so
    // expert 7 (s = 0.953) is out; expert 3 is chosen by its bias (key 1.4) and weighted by s_3 = 0.5;
    // experts 4 and 5 tie exactly (σ(1)) and the lower id comes first.
    REQUIRE(ids_of(r, 0) == std::vector<Index>{3, 0, 4, 5});
    const double s3 = 0.5, s0 = sigmoid(2), s4 = sigmoid(1), sum = s3 + s0 + 2 * s4;
    check_weights(r, 0, {2.5 * s3 / sum, 2.5 * s0 / sum, 2.5 * s4 / sum, 2.5 * s4 / sum});
  }
}

TEST_CASE("TopKRouter knobs: softmax after top-k, temperature, sqrt-softplus, bias", "[router]") {
  const auto x = rows({{0.5, -1, 2, 1.5, 0, 3, -2, 1}});
  SECTION("softmax after top-k equals softmax-top-k-renormalise") {
    const auto a = moe::test::route(identity_router(8, 3, {.softmax_after_top_k = true}), x);
    const auto b = moe::test::route(identity_router(8, 3, {}), x);
    REQUIRE(a.ids == b.ids);
    for (Index s = 0; s < 3; ++s) CHECK(a.weight(0, s) == Approx(b.weight(0, s)).epsilon(1e-14));
    const double e3 = std::exp(3.0), e2 = std::exp(2.0), e15 = std::exp(1.5);
    check_weights(a, 0, {e3 / (e3 + e2 + e15), e2 / (e3 + e2 + e15), e15 / (e3 + e2 + e15)});
  }
  SECTION("temperature divides the logits") {
    const auto r = moe::test::route(identity_router(8, 2, {.temperature = 2.0}), x);
    const double a = std::exp(1.5), b = std::exp(1.0);
    check_weights(r, 0, {a / (a + b), b / (a + b)});
  }
  SECTION("sqrt-softplus, renormalised") {
    const auto r = moe::test::route(identity_router(8, 2, {.score = ScoreFunction::sqrt_softplus}), x);
    REQUIRE(ids_of(r, 0) == std::vector<Index>{5, 2});
    const double a = std::sqrt(std::log1p(std::exp(3.0))), b = std::sqrt(std::log1p(std::exp(2.0)));
    check_weights(r, 0, {a / (a + b), b / (a + b)});
  }
  SECTION("the selection bias chooses but does not weight; update_bias follows sign(mean - count)") {
    auto router = identity_router(8, 2, {.renormalize = false, .selection_bias = true});
    router.bias()[0] = 3.0;  // lifts expert 0 (p smallest but one) into the top-2
    const auto r = moe::test::route(router, x);
    REQUIRE(ids_of(r, 0) == std::vector<Index>{0, 5});
    const auto p = softmax({0.5, -1, 2, 1.5, 0, 3, -2, 1});
    check_weights(r, 0, {p[0], p[5]});
    // counts mean 2: overloaded experts go down by the rate, underloaded up, balanced stay.
    const std::vector<Index> counts = {5, 2, 0, 2, 1, 4, 0, 2};
    router.update_bias(counts, 1e-3);
    const std::vector<double> expected = {3.0 - 1e-3, 0, 1e-3, 0, 1e-3, -1e-3, 1e-3, 0};
    for (Index e = 0; e < 8; ++e) CHECK(router.bias()[static_cast<std::size_t>(e)] == expected[static_cast<std::size_t>(e)]);
    REQUIRE_THROWS_WITH(router.update_bias(std::vector<Index>(3), 1e-3), Catch::Contains("counts has 3 entries"));
    auto plain = identity_router(8, 2, {});
    REQUIRE_THROWS_WITH(plain.update_bias(counts, 1e-3), Catch::Contains("options.selection_bias"));
  }
}

TEST_CASE("TopKRouter breaks exact ties toward the lower expert id, also between groups", "[router]") {
  auto r = moe::test::route(identity_router(5, 3, {.score = ScoreFunction::sigmoid}), rows({{1, 1, 1, 1, 1}, {0, 2, -1, 2, 2}}));
  REQUIRE(ids_of(r, 0) == std::vector<Index>{0, 1, 2});
  REQUIRE(ids_of(r, 1) == std::vector<Index>{1, 3, 4});
  // Four groups of two with equal scores: groups 0 and 1 win, then experts 0, 1, 2.
  r = moe::test::route(identity_router(8, 3, {.n_groups = 4, .top_k_groups = 2, .group_score_top = 2}),
                       rows({{0, 0, 0, 0, 0, 0, 0, 0}}));
  REQUIRE(ids_of(r, 0) == std::vector<Index>{0, 1, 2});
}

namespace {

struct Variant {
  const char* name;
  TopKOptions options;
  moe::test::WeightRule rule;
  Index min_experts = 1;  // group variants need E divisible by their groups
};

std::vector<Variant> variants() {
  return {
      {"mixtral", presets::mixtral(), {}},
      {"qwen2", presets::qwen2_moe(), {.sums_to_one = false}},
      {"softmax_after_top_k", {.softmax_after_top_k = true}, {}},
      {"sigmoid", {.score = ScoreFunction::sigmoid}, {}},
      {"sqrt_softplus", {.score = ScoreFunction::sqrt_softplus}, {}},
      {"deepseek_v2", presets::deepseek_v2(), {.sums_to_one = false, .scale = 16}, 64},
      {"deepseek_v3", presets::deepseek_v3(), {.scale = 2.5}, 64},
  };
}

}  // namespace

TEST_CASE("TopKRouter routing invariants over T in 0..130 and many shapes", "[router]") {
  moe::test::Rng rng(7);
  const Index d = 12;
  Index checked = 0, expected = 0;  // slots checked: every T of every shape was routed and looked at
  for (const auto& v : variants()) {
    for (Index E : {1, 2, 3, 8, 64, 256}) {
      if (E < v.min_experts) continue;
      for (Index k : {1, 2, 3, 8}) {
        if (k > E) continue;
        INFO(v.name << " E=" << E << " k=" << k);
        TopKRouter<float> router(shape(d, E, k), v.options);
        router.init(rng);
        if (!router.bias().empty())
          for (auto& b : router.bias()) b = static_cast<float>(0.1 * rng.normal());
        const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 130, d, 3.0);
        for (Index T = 0; T <= 130; ++T) {
          checked += moe::test::check_invariants(
              moe::test::route(router, moe::ConstMatrixView<float>(x).middle_rows(0, T)), E, v.rule);
          expected += T * k;
        }
      }
    }
  }
  CHECK(checked == expected);
  CHECK(expected > 0);
}

TEST_CASE("TopKRouter non-finite logits: documented policy, in-range ids, other tokens untouched", "[router]") {
  constexpr double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const Index E = 16, k = 4, n_tokens = 6;
  struct Case {
    const char* what;
    std::vector<std::pair<Index, double>> set;  // (expert, logit) of token 3
    bool no_finite;                             // no finite logit: weights 0
  };
  std::vector<std::pair<Index, double>> all_nan, all_minus_inf, mixed;
  for (Index e = 0; e < E; ++e) {
    all_nan.emplace_back(e, nan);
    all_minus_inf.emplace_back(e, -inf);
    mixed.emplace_back(e, e % 2 == 0 ? nan : -inf);
  }
  const std::vector<Case> cases = {
      {"one NaN logit", {{2, nan}}, false},
      {"two +inf logits", {{5, inf}, {9, inf}}, false},
      {"+inf and NaN", {{5, inf}, {9, nan}, {1, -inf}}, false},
      {"all NaN", all_nan, true},
      {"all -inf", all_minus_inf, true},
      {"NaN and -inf only", mixed, true},
  };
  for (const auto& v : variants()) {
    INFO(v.name);
    TopKRouter<double> router(shape(4, E, k), v.options);
    moe::test::Rng rng(3);
    for (auto& b : router.bias()) b = 0.01 * rng.normal();
    const RowMatrix<double> z = moe::test::normal_matrix<double>(rng, n_tokens, E);
    const auto clean = moe::test::route_logits(router, z);
    for (const auto& c : cases) {
      INFO(c.what);
      RowMatrix<double> bad = z;
      for (const auto& [e, val] : c.set) bad(3, e) = val;
      const auto r = moe::test::route_logits(router, bad);
      auto rule = v.rule;
      rule.sums_to_one = rule.sums_to_one && !c.no_finite;
      moe::test::check_invariants(r, E, rule);
      for (Index t = 0; t < n_tokens; ++t) {
        if (t == 3) continue;
        for (Index s = 0; s < k; ++s) {
          REQUIRE(r.id(t, s) == clean.id(t, s));
          REQUIRE(r.weight(t, s) == clean.weight(t, s));
        }
      }
      if (c.no_finite) {
        for (Index s = 0; s < k; ++s) CHECK(r.weight(3, s) == 0.0);
      } else {
        for (Index s = 0; s < k; ++s) CHECK(!std::isnan(bad(3, r.id(3, s))));  // NaN ranks below every other logit
      }
      if (std::string_view(c.what) == "two +inf logits" && v.options.n_groups == 1) {
        REQUIRE(r.id(3, 0) == 5);
        REQUIRE(r.id(3, 1) == 9);
        if (v.options.score != ScoreFunction::sigmoid && v.rule.sums_to_one) {
          CHECK(r.weight(3, 0) == 0.5);  // +inf logits share the weight
          CHECK(r.weight(3, 1) == 0.5);
          CHECK(r.weight(3, 2) == 0.0);
        }
      }
    }
  }
  SECTION("a NaN in x makes its token's logits NaN through the gate: lowest ids, weight 0") {
    TopKRouter<float> router(shape(4, 8, 2), {});
    RowMatrix<float> x = RowMatrix<float>::Ones(3, 4);
    x(1, 2) = std::numeric_limits<float>::quiet_NaN();
    router.gate()(0, 0) = 1;
    const auto r = moe::test::route(router, x);
    REQUIRE(r.id(1, 0) == 0);
    REQUIRE(r.id(1, 1) == 1);
    CHECK(r.weight(1, 0) == 0.0f);
    CHECK(r.weight(0, 0) == r.weight(2, 0));
  }
}

// Renormalisation where the chosen scores underflow (RELIABILITY F2; found by fuzz_router, seeds
// tests/fuzz/corpus/fuzz_router/underflow_*): the weights are those of the exact scores, computed in double
// where they do not underflow, not 0.
TEST_CASE("TopKRouter renormalises in log space where the chosen scores underflow in T", "[router]") {
  struct Case {
    const char* what;
    TopKOptions options;
    std::vector<float> z;     // one token's logits (4 experts, top-2)
    std::vector<float> bias;  // selection bias, or empty
    Index id0, id1;           // the documented choice
    std::vector<double> expected;  // f(z_id0), f(z_id1) in double, unnormalised
  };
  const auto sig = [](double z) { return sigmoid(z); };
  const auto sqsp = [](double z) { return std::sqrt(std::log1p(std::exp(z))); };
  const std::vector<Case> cases = {
      // σ(-110) = 1.7e-48 is 0 in f32: the chosen sum underflows.
      {"sigmoid, scores 0", {.score = ScoreFunction::sigmoid}, {-110, -111, -112.5f, -115}, {}, 0, 1, {sig(-110), sig(-111)}},
      // σ(-88) = 6.1e-39 is subnormal in f32: dividing by the sum would lose bits.
      {"sigmoid, subnormal scores", {.score = ScoreFunction::sigmoid}, {-88.5f, -88, -99, -97}, {}, 1, 0, {sig(-88), sig(-88.5)}},
      {"sigmoid, temperature 2", {.score = ScoreFunction::sigmoid, .temperature = 2}, {-222, -220, -231, -240}, {}, 0, 1,
       {sig(-111), sig(-110)}},
      // sqrt(softplus(-220)) = e^-110 in double, 0 in f32; ties at 0 go to the lower ids.
      {"sqrt-softplus, scores 0", {.score = ScoreFunction::sqrt_softplus}, {-220, -221, -219, -230}, {}, 0, 1,
       {sqsp(-220), sqsp(-221)}},
      // The bias chooses experts whose softmax scores are 0 in f32: the weights are the softmax of their logits.
      {"softmax, chosen by the selection bias", {.selection_bias = true}, {10, -100, -101, -103}, {0, 5, 5, 4}, 1, 2,
       {std::exp(-100.0), std::exp(-101.0)}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    TopKRouter<float> router(shape(4, 4, 2), c.options);
    moe::test::set_identity(router.gate());
    std::copy(c.bias.begin(), c.bias.end(), router.bias().begin());
    RowMatrix<float> x(1, 4);
    for (Index j = 0; j < 4; ++j) x(0, j) = c.z[static_cast<std::size_t>(j)];
    const auto r = moe::test::route(router, x);
    REQUIRE(r.id(0, 0) == c.id0);
    REQUIRE(r.id(0, 1) == c.id1);
    const double sum = c.expected[0] + c.expected[1];
    for (Index s = 0; s < 2; ++s) {
      INFO("slot " << s);
      // A few ulps of f32: log f, the subtraction of the max, exp and the division.
      CHECK(double(r.weight(0, s)) == Approx(c.expected[static_cast<std::size_t>(s)] / sum).epsilon(1e-6));
    }
  }
}

// The same in double (scores underflow below about -745), through route_backward: the log-space weights have
// the gradient of the exact weights.
TEST_CASE("TopKRouter's log-space renormalisation matches central finite differences in double", "[router][grad]") {
  struct GradCase {
    const char* what;
    TopKOptions options;
    RowMatrix<double> x;  // rows of logits (identity gate); the last row is an ordinary one
    std::vector<double> bias;
  };
  const std::vector<GradCase> cases = {
      {"sigmoid", {.score = ScoreFunction::sigmoid},
       rows({{-800, -800.7, -801.5, -803}, {-900, -899.2, -905, -901}, {0.3, -0.2, 1.1, -2}}), {}},
      {"sigmoid, temperature 0.5", {.score = ScoreFunction::sigmoid, .temperature = 0.5},
       rows({{-400, -400.3, -401, -402}, {0.3, -0.2, 1.1, -2}}), {}},
      {"sqrt-softplus", {.score = ScoreFunction::sqrt_softplus},
       rows({{-1500, -1500.6, -1502, -1510}, {0.3, -0.2, 1.1, -2}}), {}},
      {"softmax + selection bias", {.selection_bias = true},
       rows({{0, -800, -800.4, -803}, {0.3, -0.2, 1.1, -2}}), {0, 2, 2, 1}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    auto router = identity_router(4, 2, c.options);
    std::copy(c.bias.begin(), c.bias.end(), router.bias().begin());
    RowMatrix<double> x = c.x;
    const auto base = moe::test::route(router, x);
    for (Index s = 0; s < 2; ++s) REQUIRE(base.weight(0, s) > 0.1);  // not the underflowed 0
    const auto stats = moe::test::check_router_gradient(router, x, 17, [](const auto&) {});
    REQUIRE(stats.max_abs_dx > 1e-3);  // not the constant 0 of underflowed weights
  }
}

TEST_CASE("TopKRouter::route_backward matches central finite differences in double", "[router][grad]") {
  struct GradCase {
    const char* name;
    Index k;
    TopKOptions options;
    bool zero_gradient = false;  // documented: top-1 renormalised weight is constantly 1
  };
  const std::vector<GradCase> cases = {
      {"softmax renormalised k=1", 1, {}, true},
      {"softmax renormalised k=2", 2, {}},
      {"softmax renormalised k=3", 3, {}},
      {"softmax raw (Qwen2)", 3, presets::qwen2_moe()},
      {"softmax after top-k", 3, {.softmax_after_top_k = true}},
      {"gpt-oss: gate bias, softmax after top-k", 3, presets::gpt_oss()},
      {"gate bias, sigmoid renormalised", 2, {.score = ScoreFunction::sigmoid, .gate_bias = true}},
      {"sigmoid + bias + groups x 2.5 (V3 form)",
       3,
       {.score = ScoreFunction::sigmoid,
        .selection_bias = true,
        .n_groups = 4,
        .top_k_groups = 2,
        .group_score_top = 2,
        .routed_scaling_factor = 2.5}},
      {"softmax raw + groups by max x 16 (V2 form)",
       3,
       {.renormalize = false, .n_groups = 4, .top_k_groups = 2, .group_score_top = 1, .routed_scaling_factor = 16}},
      {"sqrt-softplus renormalised", 2, {.score = ScoreFunction::sqrt_softplus}},
      {"sqrt-softplus raw", 2, {.score = ScoreFunction::sqrt_softplus, .renormalize = false}},
      {"sigmoid raw, temperature 0.7", 2, {.score = ScoreFunction::sigmoid, .renormalize = false, .temperature = 0.7}},
      {"jitter 0.2 (training)", 2, {.jitter = 0.2, .seed = 5}},
      {"Gumbel noise (training)", 2, {.gumbel_noise = true, .seed = 9}},
  };
  double worst = 0;
  for (const auto& c : cases) {
    for (const Index d : {5, 17}) {
      INFO(c.name << " d=" << d);
      const Index E = 8, n_tokens = 4;
      TopKRouter<double> router(shape(d, E, c.k), c.options);
      router.set_training(true);
      router.set_step(3);
      moe::test::Rng rng(100 + static_cast<std::uint64_t>(d));
      router.init(rng);
      for (auto& b : router.bias()) b = 0.05 * rng.normal();
      RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n_tokens, d, 3.0);
      const bool gumbel = c.options.gumbel_noise;
      const auto stats = moe::test::check_router_gradient(router, x, 11, [&](const auto& r) {
        if (!gumbel) assert_top_k_gaps(router, r);
      });
      if (c.zero_gradient) {
        REQUIRE(stats.max_abs_dparam == 0.0);
      } else {
        REQUIRE(std::max(stats.max_abs_dx, stats.max_abs_dparam) > 1e-3);
      }
      worst = std::max(worst, stats.max_abs_error);
    }
  }
  WARN("TopKRouter: max |analytic - numeric| = " << worst);
  REQUIRE(worst < 1e-6);
}

TEST_CASE("TopKRouter noise is reproducible, step-dependent and thread-count independent", "[router]") {
  const Index d = 16, E = 64, k = 4, n_tokens = 77;
  TopKRouter<float> router(shape(d, E, k), {.jitter = 0.05, .gumbel_noise = true, .seed = 42});
  moe::test::Rng rng(8);
  router.init(rng);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, d);
  const auto clean = moe::test::route(router, x);
  router.set_training(true);
  router.set_step(10);
  const auto a = moe::test::route(router, x);
  const auto b = moe::test::route(router, x);
  REQUIRE(a.ids == b.ids);
  REQUIRE(a.weights == b.weights);
  REQUIRE(a.ids != clean.ids);  // the noise changes choices
  router.set_step(11);
  REQUIRE(moe::test::route(router, x).ids != a.ids);
  router.set_step(10);
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  for (int n : {1, 2, 3}) {
    omp_set_num_threads(n);
    const auto c = moe::test::route(router, x);
    REQUIRE(c.ids == a.ids);
    REQUIRE(c.weights == a.weights);
  }
  omp_set_num_threads(threads);
#endif
  router.set_training(false);
  const auto off = moe::test::route(router, x);
  REQUIRE(off.ids == clean.ids);
  REQUIRE(off.weights == clean.weights);
}

TEST_CASE("TopKSoftmax is TopKRouter with the Mixtral knobs, bit for bit", "[router]") {
  moe::test::Rng rng(5);
  for (const bool renormalize : {true, false}) {
    moe::routers::TopKSoftmax<float> a(shape(24, 64, 6), {.renormalize = renormalize});
    TopKRouter<float> b(shape(24, 64, 6), {.renormalize = renormalize});
    a.init(rng);
    std::copy_n(a.gate().data(), 64 * 24, b.gate().data());
    const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 50, 24);
    const auto ra = moe::test::route(a, x);
    const auto rb = moe::test::route(b, x);
    REQUIRE(ra.ids == rb.ids);
    REQUIRE(ra.weights == rb.weights);
    REQUIRE(moe::test::saved_rows(ra.out.saved.scores, 50, 64) == moe::test::saved_rows(rb.out.saved.scores, 50, 64));
    REQUIRE((ra.out.saved.chosen_logits == nullptr) == (rb.out.saved.chosen_logits == nullptr));
    if (renormalize)
      REQUIRE(moe::test::saved_rows(ra.out.saved.chosen_logits, 50, 6) ==
              moe::test::saved_rows(rb.out.saved.chosen_logits, 50, 6));
  }
}

TEST_CASE("TopKRouter rejects a bad configuration with the field's name", "[router]") {
  const auto bad = [](const moe::MoEConfig& s, const TopKOptions& o, const char* field) {
    INFO(field);
    REQUIRE_THROWS_AS(TopKRouter<float>(s, o), moe::Error);
    REQUIRE_THROWS_WITH(TopKRouter<float>(s, o), Catch::Contains(field));
  };
  bad(shape(4, 8, 0), {}, "top_k");
  bad(shape(4, 8, 9), {}, "top_k");
  bad(shape(4, 0, 1), {}, "n_experts");
  bad(shape(4, 8, 2), {.score = ScoreFunction::sigmoid, .softmax_after_top_k = true}, "options.softmax_after_top_k");
  bad(shape(4, 8, 2), {.n_groups = 3}, "options.n_groups");
  bad(shape(4, 8, 2), {.n_groups = 4, .top_k_groups = 5}, "options.top_k_groups");
  bad(shape(4, 8, 2), {.n_groups = 4, .top_k_groups = 2, .group_score_top = 3}, "options.group_score_top");
  bad(shape(4, 8, 5), {.n_groups = 4, .top_k_groups = 2}, "options.top_k_groups");
  bad(shape(4, 8, 2), {.routed_scaling_factor = 0}, "options.routed_scaling_factor");
  bad(shape(4, 8, 2), {.routed_scaling_factor = std::numeric_limits<double>::quiet_NaN()}, "options.routed_scaling_factor");
  bad(shape(4, 8, 2), {.temperature = -1}, "options.temperature");
  bad(shape(4, 8, 2), {.jitter = 1.0}, "options.jitter");
}
