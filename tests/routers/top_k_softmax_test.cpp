// routers::TopKSoftmax: hand-computed Mixtral numerics, ties, renormalisation, non-finite logits and
// routing invariants.

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/routers/top_k_softmax.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"
#include "support/routing.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

// A router whose gate is the identity, so the logits are exactly the input row.
template <class T>
struct IdentityRouter {
  moe::routers::TopKSoftmax<T> router;
  IdentityRouter(Index E, Index k, bool renormalize = true)
      : router(moe::MoEConfig{.d_model = E, .d_ff = 1, .n_experts = E, .top_k = k}, {.renormalize = renormalize}) {
    auto g = router.gate();
    for (Index e = 0; e < E; ++e) g(e, e) = T(1);
  }
  void route(const RowMatrix<T>& logits, std::vector<Index>& ids, std::vector<T>& w) {
    auto r = moe::test::route(router, logits);
    ids = std::move(r.ids);
    w = std::move(r.weights);
  }
};

RowMatrix<float> row(std::initializer_list<float> v) {
  RowMatrix<float> m(1, static_cast<Index>(v.size()));
  Index j = 0;
  for (float x : v) m(0, j++) = x;
  return m;
}

}  // namespace

TEST_CASE("TopKSoftmax reproduces Mixtral's softmax-top-k-renormalise by hand", "[router]") {
  IdentityRouter<float> r(4, 2);
  std::vector<Index> ids;
  std::vector<float> w;
  // z = (1, 3, 2, 0): top-2 = {1, 2}; weights = softmax over (3, 2) = (e/(e+1), 1/(e+1)).
  r.route(row({1, 3, 2, 0}), ids, w);
  REQUIRE(ids == std::vector<Index>{1, 2});
  const double e = std::exp(1.0);
  CHECK(w[0] == Approx(e / (e + 1)).epsilon(1e-6));
  CHECK(w[1] == Approx(1 / (e + 1)).epsilon(1e-6));

  // Without renormalisation (Qwen2-MoE, DeepSeek-V2) the weights are the softmax over all four.
  IdentityRouter<float> raw(4, 2, false);
  raw.route(row({1, 3, 2, 0}), ids, w);
  const double sum = std::exp(1.0) + std::exp(3.0) + std::exp(2.0) + 1.0;
  CHECK(w[0] == Approx(std::exp(3.0) / sum).epsilon(1e-6));
  CHECK(w[1] == Approx(std::exp(2.0) / sum).epsilon(1e-6));
}

TEST_CASE("TopKSoftmax breaks exact ties toward the lower expert id", "[router]") {
  IdentityRouter<float> r(5, 3);
  std::vector<Index> ids;
  std::vector<float> w;
  r.route(row({1, 1, 1, 1, 1}), ids, w);
  REQUIRE(ids == std::vector<Index>{0, 1, 2});
  for (float v : w) CHECK(v == Approx(1.0 / 3).epsilon(1e-6));
  r.route(row({0, 2, -1, 2, 2}), ids, w);
  REQUIRE(ids == std::vector<Index>{1, 3, 4});
  r.route(row({-0.0f, 0.0f, -5, -5, 0.0f}), ids, w);  // -0 and +0 tie
  REQUIRE(ids == std::vector<Index>{0, 1, 4});
}

TEST_CASE("TopKSoftmax never returns an out-of-range id or a NaN weight for non-finite logits", "[router]") {
  IdentityRouter<float> r(4, 2);
  std::vector<Index> ids;
  std::vector<float> w;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Logits that overflow to +inf (1e30 * 1e10) share the weight; the gate product of a token with an
  // inf element would be NaN everywhere (0 * inf), hence the overflow.
  for (Index e = 0; e < 4; ++e) r.router.gate()(e, e) = 1e10f;
  r.route(row({0, 1e30f, 5, 1e30f}), ids, w);
  REQUIRE(ids == std::vector<Index>{1, 3});
  CHECK(w[0] == 0.5f);
  CHECK(w[1] == 0.5f);
  // A NaN in the token makes every logit NaN through the gate product: the row has no finite logit, the
  // documented result is the lowest ids with weight 0.
  r.route(row({0, nan, 5, 1}), ids, w);
  REQUIRE(ids == std::vector<Index>{0, 1});
  CHECK(w[0] == 0.0f);
  CHECK(w[1] == 0.0f);
}

TEST_CASE("TopKSoftmax routing invariants over many shapes", "[router]") {
  moe::test::Rng rng(99);
  for (Index E : {1, 2, 3, 8, 64, 256}) {
    for (Index k : {Index{1}, std::min<Index>(E, 2), std::min<Index>(E, 8), E}) {
      if (k > 8 && E > 8 && k != E) continue;
      const Index d = 24;
      moe::routers::TopKSoftmax<float> router(moe::MoEConfig{.d_model = d, .d_ff = 1, .n_experts = E, .top_k = k});
      router.init(rng);
      for (Index T : {0, 1, 17, 130}) {
        const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, T, d);
        const auto routed = moe::test::route(router, x);  // outputs poisoned, workspace measured first
        const std::vector<Index>& ids = routed.ids;
        const std::vector<float>& w = routed.weights;
        for (Index t = 0; t < T; ++t) {
          std::set<Index> distinct;
          double sum = 0;
          for (Index s = 0; s < k; ++s) {
            const auto i = static_cast<std::size_t>(t * k + s);
            REQUIRE(ids[i] >= 0);
            REQUIRE(ids[i] < E);
            distinct.insert(ids[i]);
            REQUIRE(std::isfinite(w[i]));
            REQUIRE(w[i] >= 0.0f);
            REQUIRE(w[i] <= 1.0f);
            sum += w[i];
          }
          REQUIRE(static_cast<Index>(distinct.size()) == k);
          REQUIRE(std::abs(sum - 1.0) <= 4.0 * static_cast<double>(k) * 0x1.0p-24);
        }
      }
    }
  }
}

TEST_CASE("TopKSoftmax::route_backward matches central finite differences in double", "[router][grad]") {
  for (const bool renormalize : {true, false}) {
    for (const Index k : {1, 2, 4}) {
      const Index T = 5, d = 7, E = 6;
      moe::routers::TopKSoftmax<double> router(moe::MoEConfig{.d_model = d, .d_ff = 1, .n_experts = E, .top_k = k},
                                               {.renormalize = renormalize});
      moe::test::Rng rng(40 + static_cast<std::uint64_t>(k));
      router.init(rng);
      RowMatrix<double> x = moe::test::normal_matrix<double>(rng, T, d, 2.0);
      const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, T, k);  // L = sum(weights .* r)
      moe::Workspace ws(1 << 16);
      std::vector<Index> ids(static_cast<std::size_t>(T * k));
      std::vector<double> w(static_cast<std::size_t>(T * k));
      moe::Workspace saved_ws(1 << 16);
      moe::Arena saved_arena(saved_ws);
      moe::RouteOutputOf<decltype(router)> out{ids.data(), w.data(), router.carve_saved(saved_arena, T)};
      const auto route = [&] {
        moe::Arena arena(ws);
        router.route({.x = x}, out, arena);
      };
      route();
      // Away from top-k boundaries: the k-th and (k+1)-th probabilities differ by >= 1e-3.
      for (Index t = 0; t < T && k < E; ++t) {
        std::vector<double> p(out.saved.scores + t * E, out.saved.scores + (t + 1) * E);
        std::sort(p.begin(), p.end(), std::greater<>());
        REQUIRE(p[static_cast<std::size_t>(k - 1)] - p[static_cast<std::size_t>(k)] >= 1e-3);
      }
      RowMatrix<double> dx = RowMatrix<double>::Zero(T, d);
      router.visit_parameters([](std::string_view, moe::Parameter<double>& p) { p.zero_grad(); });
      {
        moe::Arena arena(ws);
        router.route_backward({.x = x}, out, {.dweights = r.data(), .dx = dx}, arena);
      }
      const auto loss = [&] {
        route();
        double l = 0;
        for (Index i = 0; i < T * k; ++i) l += w[static_cast<std::size_t>(i)] * r.data()[i];
        return l;
      };
      INFO("renormalize=" << renormalize << " k=" << k);
      const auto sx = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
      moe::Parameter<double>* gate = nullptr;
      router.visit_parameters([&](std::string_view, moe::Parameter<double>& p) { gate = &p; });
      const auto sg = moe::test::check_gradient("dgate", *gate, loss);
      if (renormalize && k == 1) {
        REQUIRE(sg.max_abs_numeric == 0.0);  // the weight is constantly 1 (documented)
      } else {
        REQUIRE(std::max(sx.max_abs_numeric, sg.max_abs_numeric) > 1e-3);
      }
    }
  }
}
