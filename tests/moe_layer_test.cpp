// MoELayer against the independent naive double implementation (moe/reference/naive_moe.hpp) on awkward shapes,
// forced routings, bad input, aliasing, workspace reuse and thread-count determinism.

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/detail/eigen_view.hpp>
#include <moe/moe.hpp>

#include <moe/reference/naive_moe.hpp>
#include "support/f32_vs_f64.hpp"
#include "support/gradcheck.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"
#include "support/threads.hpp"

using moe::Index;
using moe::MoEConfig;
using moe::RowMatrix;

namespace {

template <class T>
using Layer = moe::MixtralMoEType<T>;

// Float output vs the double reference: NMSE bound of RELIABILITY.md N1 for f32, near-exact for f64.
template <class T>
double nmse_bound() {
  return std::is_same_v<T, float> ? 1e-7 : 1e-24;
}

// Every token's chosen experts must equal the reference's, slot by slot, and the result must not be vacuous.
// The ids are compared only where that holds on every instruction set: the reference's k-th and (k+1)-th
// logits (and every pair of chosen ones, which fixes the slot order) must be further apart than the error
// bounds gamma_d sum |g x| of the layer's logits plus 3 eps_softmax, what the softmax kernel's relative error
// (10 eps32 for f32, RELIABILITY N3; 1e-14 for f64, kernels/softmax_test) could reverse. Asserted: the data
// has no near-tie.
template <class T>
void check_against_naive(const Layer<T>& layer, const RowMatrix<T>& x) {
  RowMatrix<T> y(x.rows(), layer.d_model());
  moe::Workspace ws;
  const auto res = layer.forward(x, y, ws);
  std::vector<std::vector<Index>> chosen;
  const RowMatrix<double> ref = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<T>(x), &chosen);
  INFO("T=" << x.rows() << " E=" << layer.n_experts() << " k=" << layer.top_k());
  REQUIRE(res.n_tokens == x.rows());
  const auto gate = layer.router().gate();  // (n_experts, d_model)
  const Index E = layer.n_experts(), k = layer.top_k(), d = layer.d_model();
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<std::pair<double, double>> z;  // (logit, error bound), descending
    for (Index e = 0; e < E; ++e) {
      double v = 0, m = 0;
      for (Index j = 0; j < d; ++j) {
        v += double(gate(e, j)) * double(x(t, j));
        m += std::abs(double(gate(e, j)) * double(x(t, j)));
      }
      z.emplace_back(v, moe::test::gamma_n<T>(static_cast<double>(d)) * m);
    }
    std::sort(z.begin(), z.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (Index s = 0; s + 1 < std::min(E, k + 1); ++s) {
      INFO("token " << t << ": near-tie between ranks " << s << " and " << s + 1);
      const auto& [za, ea] = z[static_cast<std::size_t>(s)];
      const auto& [zb, eb] = z[static_cast<std::size_t>(s + 1)];
      REQUIRE(za - zb > ea + eb + 3 * (std::is_same_v<T, float> ? 10 * 0x1.0p-23 : 1e-14));
    }
    for (Index s = 0; s < k; ++s)
      REQUIRE(res.expert_ids[static_cast<std::size_t>(t * k + s)] ==
              chosen[static_cast<std::size_t>(t)][static_cast<std::size_t>(s)]);
  }
  REQUIRE(ref.norm() > 0.0);
  CHECK(moe::test::nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size())) <= nmse_bound<T>());
}

// A workspace for forwards whose routing result is not kept.
moe::Workspace& layer_ws() {
  static moe::Workspace ws;
  return ws;
}

template <class T>
RowMatrix<T> random_tokens(Index n_tokens, Index d, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  return moe::test::normal_matrix<T>(rng, n_tokens, d);
}

}  // namespace

TEMPLATE_TEST_CASE("MoELayer matches the naive reference on awkward shapes", "[layer]", float, double) {
  struct Shape {
    Index n_tokens, d_model, d_ff, n_experts, top_k;
  };
  // 1 token; 1 expert; k = E; SIMD-width edges in d_model and d_ff; more tokens than a thread chunk.
  const std::vector<Shape> shapes = {{1, 16, 32, 8, 2}, {5, 17, 33, 1, 1},  {9, 15, 7, 4, 4},
                                     {33, 31, 65, 8, 2}, {130, 64, 96, 16, 3}, {3, 1, 1, 3, 2}};
  for (const auto& s : shapes) {
    Layer<TestType> layer(MoEConfig{.d_model = s.d_model, .d_ff = s.d_ff, .n_experts = s.n_experts, .top_k = s.top_k});
    layer.init(42);
    check_against_naive(layer, random_tokens<TestType>(s.n_tokens, s.d_model, 7));
  }
}

TEMPLATE_TEST_CASE("MoELayer with an expert that receives no token and with all tokens on one expert", "[layer]",
                   float, double) {
  const Index d = 12, E = 6;
  Layer<TestType> layer(MoEConfig{.d_model = d, .d_ff = 20, .n_experts = E, .top_k = 2});
  layer.init(3);
  // Feature 0 of every token is 1; gate column 0 then pins the routing: expert 4 always first (+8),
  // expert 1 never chosen (-8).
  RowMatrix<TestType> x = random_tokens<TestType>(40, d, 11);
  x.col(0).setOnes();
  auto gate = layer.router().gate();
  gate(4, 0) = 8;
  gate(1, 0) = -8;
  check_against_naive(layer, x);

  RowMatrix<TestType> y(x.rows(), d);
  const auto res = layer.forward(x, y);
  REQUIRE(res.tokens_per_expert[4] == x.rows());  // all tokens on expert 4
  REQUIRE(res.tokens_per_expert[1] == 0);         // expert 1 receives nothing
  Index total = 0;
  for (Index c : res.tokens_per_expert) total += c;
  REQUIRE(total == x.rows() * 2);
}

TEST_CASE("MoELayer routing weights are renormalised and ordered", "[layer]") {
  Layer<float> layer(MoEConfig{.d_model = 32, .d_ff = 16, .n_experts = 8, .top_k = 3});
  layer.init(5);
  const RowMatrix<float> x = random_tokens<float>(50, 32, 9);
  RowMatrix<float> y(50, 32);
  const auto res = layer.forward(x, y);
  for (Index t = 0; t < 50; ++t) {
    float sum = 0;
    for (Index s = 0; s < 3; ++s) {
      const float w = res.expert_weights[static_cast<std::size_t>(t * 3 + s)];
      REQUIRE(w >= 0.0f);
      REQUIRE(w <= 1.0f);
      if (s > 0) REQUIRE(w <= res.expert_weights[static_cast<std::size_t>(t * 3 + s - 1)]);
      sum += w;
    }
    REQUIRE(std::abs(sum - 1.0f) <= 4 * 3 * std::numeric_limits<float>::epsilon() / 2);
  }
}

TEST_CASE("MoELayer rejects bad configurations with the field's name", "[layer][error]") {
  using Catch::Matchers::Contains;
  const auto make = [](MoEConfig c) { Layer<float> layer(c); };
  REQUIRE_THROWS_WITH(make({.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 0}), Contains("top_k = 0"));
  REQUIRE_THROWS_WITH(make({.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 5}),
                      Contains("top_k = 5 exceeds n_experts = 4"));
  REQUIRE_THROWS_WITH(make({.d_model = 8, .d_ff = 8, .n_experts = 0, .top_k = 1}), Contains("n_experts = 0"));
  REQUIRE_THROWS_WITH(make({.d_model = 0, .d_ff = 8, .n_experts = 4, .top_k = 1}), Contains("d_model = 0"));
  REQUIRE_THROWS_WITH(make({.d_model = 8, .d_ff = -1, .n_experts = 4, .top_k = 1}), Contains("d_ff = -1"));
  REQUIRE_THROWS_AS(make({.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 9}), moe::Error);
  REQUIRE_THROWS_AS(make({.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 9}), std::invalid_argument);
}

TEST_CASE("MoELayer rejects banks that disagree with the router", "[layer][error]") {
  using Catch::Matchers::Contains;
  const MoEConfig cfg{.d_model = 8, .d_ff = 8, .n_experts = 4, .top_k = 2};
  MoEConfig other = cfg;
  other.n_experts = 3;
  REQUIRE_THROWS_WITH(Layer<float>(moe::routers::TopKSoftmax<float>(cfg), moe::experts::SwiGLU<float>(other)),
                      Contains("banks hold 3 experts"));
  other = cfg;
  other.d_model = 9;
  REQUIRE_THROWS_WITH(Layer<float>(moe::routers::TopKSoftmax<float>(cfg), moe::experts::SwiGLU<float>(other)),
                      Contains("d_model = 9"));
}

TEST_CASE("MoELayer::forward rejects bad input before writing anything", "[layer][error]") {
  using Catch::Matchers::Contains;
  Layer<float> layer(MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  layer.init(1);
  const float canary = -12345.0f;

  SECTION("wrong input width") {
    RowMatrix<float> x = random_tokens<float>(5, 7, 1), y = RowMatrix<float>::Constant(5, 8, canary);
    REQUIRE_THROWS_WITH(layer.forward(x, y), Contains("x is (5, 7) but d_model = 8"));
    REQUIRE((y.array() == canary).all());
  }
  SECTION("wrong output shape") {
    RowMatrix<float> x = random_tokens<float>(5, 8, 1), y = RowMatrix<float>::Constant(4, 8, canary);
    REQUIRE_THROWS_WITH(layer.forward(x, y), Contains("y is (4, 8), expected (5, 8)"));
    REQUIRE((y.array() == canary).all());
  }
  SECTION("NaN and infinity in the input") {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()}) {
      RowMatrix<float> x = random_tokens<float>(5, 8, 1), y = RowMatrix<float>::Constant(5, 8, canary);
      x(3, 6) = bad;
      REQUIRE_THROWS_WITH(layer.forward(x, y), Contains("x(3, 6)"));
      REQUIRE((y.array() == canary).all());
    }
  }
}

TEST_CASE("MoELayer on an empty batch returns at once", "[layer]") {
  Layer<float> layer(MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  RowMatrix<float> x(0, 8), y(0, 8);
  moe::Workspace ws;
  const auto res = layer.forward(x, y, ws);
  REQUIRE(res.n_tokens == 0);
  REQUIRE(res.expert_ids.empty());
  REQUIRE(ws.allocations() == 0);
}

TEST_CASE("MoELayer output may alias its input", "[layer]") {
  Layer<float> layer(MoEConfig{.d_model = 24, .d_ff = 40, .n_experts = 5, .top_k = 2});
  layer.init(8);
  RowMatrix<float> x = random_tokens<float>(20, 24, 4), y(20, 24);
  layer.forward(x, y);
  layer.forward(x, x);
  REQUIRE(std::memcmp(x.data(), y.data(), sizeof(float) * static_cast<std::size_t>(y.size())) == 0);
}

TEST_CASE("MoELayer workspace grows once and is reused at the same or smaller sizes", "[layer][workspace]") {
  Layer<float> layer(MoEConfig{.d_model = 16, .d_ff = 32, .n_experts = 4, .top_k = 2});
  layer.init(2);
  moe::Workspace ws;
  RowMatrix<float> x = random_tokens<float>(64, 16, 3), y(64, 16);
  layer.forward(x, y, ws);
  REQUIRE(ws.allocations() == 1);
  REQUIRE(ws.capacity() == layer.workspace_bytes(64));
  for (Index t : {64, 1, 17, 63}) layer.forward(x.topRows(t), y.topRows(t), ws);
  REQUIRE(ws.allocations() == 1);
  layer.forward(RowMatrix<float>(random_tokens<float>(65, 16, 3)), RowMatrix<float>(65, 16), ws);
  REQUIRE(ws.allocations() == 2);
  REQUIRE(layer.workspace_bytes(1) < layer.workspace_bytes(64));
}

TEST_CASE("MoELayer results are bitwise identical for any thread count and on repeat", "[layer][determinism]") {
  Layer<float> layer(MoEConfig{.d_model = 64, .d_ff = 600, .n_experts = 8, .top_k = 2});
  layer.init(17);
  const RowMatrix<float> x = random_tokens<float>(77, 64, 5);
  RowMatrix<float> first(77, 64);
  layer.forward(x, first);
  moe::test::for_each_thread_count([&](int threads) {
    RowMatrix<float> again(77, 64);
    moe::Workspace ws;
    layer.forward(x, again, ws);
    INFO(threads << " threads");
    REQUIRE(std::memcmp(first.data(), again.data(), sizeof(float) * static_cast<std::size_t>(first.size())) == 0);
  });
}

TEST_CASE("MoELayer forwards from two threads at once give the sequential results, packing included",
          "[layer][threads]") {
  // The layer is const in forward; each caller brings its Workspace. The first calls race to pack the
  // (lazily packed, per expert) panels: one input routes 3 tokens, the other 40, so they need different
  // and overlapping experts at the same time.
  const MoEConfig cfg{.d_model = 64, .d_ff = 128, .n_experts = 8, .top_k = 2};
  Layer<float> layer(cfg);
  layer.init(21);
  Layer<float> sequential(cfg);  // the same weights, for the expected results
  sequential.init(21);
  const std::vector<RowMatrix<float>> xs = {random_tokens<float>(3, 64, 31), random_tokens<float>(40, 64, 32)};
  std::vector<RowMatrix<float>> expected;
  for (const auto& x : xs) {
    RowMatrix<float> y(x.rows(), cfg.d_model);
    moe::Workspace ws;
    sequential.forward(x, y, ws);
    expected.push_back(y);
  }
  std::atomic<int> ready{0};
  std::vector<int> mismatches(2, 0);
  auto run = [&](std::size_t i) {
    moe::Workspace ws;
    RowMatrix<float> y(xs[i].rows(), cfg.d_model);
    ready.fetch_add(1);
    while (ready.load() < 2) {
    }
    for (int rep = 0; rep < 20; ++rep) {
      std::as_const(layer).forward(xs[i], y, ws);
      if (y != expected[i]) ++mismatches[i];
    }
  };
  std::thread a(run, std::size_t{0}), b(run, std::size_t{1});
  a.join();
  b.join();
  CHECK(mismatches[0] == 0);
  CHECK(mismatches[1] == 0);
}

// ---- training: backward ----------------------------------------------------------------------------

namespace {

// L = sum(y .* R) for a fixed random R, so dL/dy = R.
double projected_loss(const RowMatrix<double>& y, const RowMatrix<double>& r) { return (y.array() * r.array()).sum(); }

}  // namespace

TEST_CASE("MoELayer::backward matches central finite differences in double", "[layer][grad]") {
  struct Shape {
    Index n_tokens, d_model, d_ff, n_experts, top_k;
  };
  // RELIABILITY.md G1 shape (T=3, d=5, h=7, E=4, k=2), one d=17 case, k = 1, and k = E.
  for (const Shape s : {Shape{3, 5, 7, 4, 2}, Shape{6, 17, 9, 5, 3}, Shape{4, 6, 5, 3, 1}, Shape{3, 4, 6, 3, 3}}) {
    Layer<double> layer(MoEConfig{.d_model = s.d_model, .d_ff = s.d_ff, .n_experts = s.n_experts, .top_k = s.top_k});
    layer.init(100 + static_cast<std::uint64_t>(s.d_model));
    RowMatrix<double> x = random_tokens<double>(s.n_tokens, s.d_model, 5);
    moe::test::Rng rng(12);
    const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, s.n_tokens, s.d_model);
    RowMatrix<double> y(s.n_tokens, s.d_model), dx(s.n_tokens, s.d_model);
    moe::TrainingContext<double> ctx;
    const auto res = layer.forward(x, y, ctx);

    // Away from top-k boundaries: the k-th and (k+1)-th logits of every token differ by >= 1e-3 (>> h).
    if (s.top_k < s.n_experts) {
      for (Index t = 0; t < s.n_tokens; ++t) {
        RowMatrix<double> logits = x.row(t) * moe::detail::eigen(std::as_const(layer).router().gate()).transpose();
        std::vector<double> z(logits.data(), logits.data() + s.n_experts);
        std::sort(z.begin(), z.end(), std::greater<>());
        REQUIRE(z[static_cast<std::size_t>(s.top_k - 1)] - z[static_cast<std::size_t>(s.top_k)] >= 1e-3);
      }
    }
    layer.zero_grad();
    layer.backward(r, dx, ctx);
    REQUIRE(res.n_tokens == s.n_tokens);

    const auto loss = [&] {
      RowMatrix<double> out(s.n_tokens, s.d_model);
      layer.forward(x, out);
      return projected_loss(out, r);
    };
    INFO("T=" << s.n_tokens << " d=" << s.d_model << " ff=" << s.d_ff << " E=" << s.n_experts << " k=" << s.top_k);
    double biggest = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss).max_abs_numeric;
    layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
      const auto st = moe::test::check_gradient(name, p, loss, 48);
      if (name != "router.gate" || s.top_k > 1) biggest = std::max(biggest, st.max_abs_numeric);
    });
    REQUIRE(biggest > 1e-3);  // not vacuous
  }
}

TEST_CASE("MoELayer top-1 with renormalisation gives the router no gradient (documented)", "[layer][grad]") {
  Layer<double> layer(MoEConfig{.d_model = 6, .d_ff = 8, .n_experts = 4, .top_k = 1});
  layer.init(9);
  const RowMatrix<double> x = random_tokens<double>(10, 6, 2);
  RowMatrix<double> y(10, 6), dx(10, 6);
  moe::TrainingContext<double> ctx;
  layer.forward(x, y, ctx);
  layer.backward(RowMatrix<double>(RowMatrix<double>::Ones(10, 6)), dx, ctx);
  const auto g = moe::detail::eigen(moe::ConstMatrixView<double>(layer.router().gate()));
  bool router_zero = true;
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    if (name == "router.gate") router_zero = (moe::detail::eigen(p.grad()).array() == 0.0).all();
  });
  REQUIRE(g.size() == 24);
  REQUIRE(router_zero);
}

TEST_CASE("MoELayer: an expert that receives no token gets exactly zero gradient, even after stale work",
          "[layer][grad]") {
  const Index d = 8, ff = 12, E = 4;
  Layer<float> layer(MoEConfig{.d_model = d, .d_ff = ff, .n_experts = E, .top_k = 2});
  layer.init(21);
  moe::TrainingContext<float> ctx;
  RowMatrix<float> x = random_tokens<float>(30, d, 8), y(30, d), dx(30, d);
  // First a step where expert 2 is used, so the context's workspaces hold its stale intermediates.
  layer.router().gate()(2, 0) = 50;
  x.col(0).setOnes();
  layer.forward(x, y, ctx);
  layer.backward(RowMatrix<float>(RowMatrix<float>::Ones(30, d)), dx, ctx);
  // Then expert 2 is never chosen.
  layer.router().gate()(2, 0) = -50;
  layer.zero_grad();
  const auto res = layer.forward(x, y, ctx);
  REQUIRE(res.tokens_per_expert[2] == 0);
  layer.backward(RowMatrix<float>(RowMatrix<float>::Ones(30, d)), dx, ctx);
  auto& bank = layer.bank<0>();
  Index zero_rows_checked = 0;
  bank.visit_parameters([&](std::string_view name, moe::Parameter<float>& p) {
    const auto g = p.grad();
    const Index rows_per_expert = g.rows() / E;
    bool others_nonzero = false;
    for (Index e = 0; e < E; ++e) {
      for (Index i = e * rows_per_expert; i < (e + 1) * rows_per_expert; ++i) {
        for (Index j = 0; j < g.cols(); ++j) {
          if (e == 2) {
            INFO(name << " row " << i);
            REQUIRE(std::bit_cast<std::uint32_t>(g(i, j)) == 0u);  // +0.0 exactly, not NaN, not -0
            ++zero_rows_checked;
          } else {
            others_nonzero |= g(i, j) != 0.0f;
          }
        }
      }
    }
    REQUIRE(others_nonzero);
  });
  REQUIRE(zero_rows_checked == 3 * ff * d);
}

TEST_CASE("MoELayer gradients are bitwise identical for any thread count", "[layer][grad][determinism]") {
  Layer<float> layer(MoEConfig{.d_model = 48, .d_ff = 300, .n_experts = 6, .top_k = 2});
  layer.init(33);
  const RowMatrix<float> x = random_tokens<float>(150, 48, 6);
  moe::test::Rng rng(2);
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, 150, 48);
  std::vector<std::vector<float>> reference;
  RowMatrix<float> dx_ref;
  moe::test::for_each_thread_count([&](int threads) {
    moe::TrainingContext<float> ctx;
    RowMatrix<float> y(150, 48), dx(150, 48);
    layer.zero_grad();
    layer.forward(x, y, ctx);
    layer.backward(dy, dx, ctx);
    std::vector<std::vector<float>> grads;
    layer.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
      const auto g = p.grad();
      grads.emplace_back(g.data(), g.data() + g.rows() * g.cols());
    });
    if (reference.empty()) {
      reference = grads;
      dx_ref = dx;
    } else {
      INFO(threads << " threads");
      REQUIRE(grads == reference);
      REQUIRE(std::memcmp(dx.data(), dx_ref.data(), sizeof(float) * static_cast<std::size_t>(dx.size())) == 0);
    }
  });
}

TEST_CASE("MoELayer f32 backward agrees with the double backward", "[layer][grad]") {
  const MoEConfig cfg{.d_model = 40, .d_ff = 72, .n_experts = 5, .top_k = 2};
  Layer<float> lf(cfg);
  Layer<double> ld(cfg);
  lf.init(3);
  const RowMatrix<float> xf = random_tokens<float>(64, 40, 4);
  moe::test::Rng rng(5);
  const RowMatrix<float> dyf = moe::test::normal_matrix<float>(rng, 64, 40);
  moe::test::check_backward_against_double(lf, ld, xf, dyf, 1e-7);
}

TEST_CASE("MoELayer::backward rejects a foreign context, bad shapes and NaN before writing", "[layer][error]") {
  using Catch::Matchers::Contains;
  Layer<float> layer(MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  Layer<float> other(MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  layer.init(1);
  const RowMatrix<float> x = random_tokens<float>(5, 8, 1);
  RowMatrix<float> y(5, 8);
  moe::TrainingContext<float> ctx;
  layer.forward(x, y, ctx);
  const float canary = -777.0f;
  RowMatrix<float> dx = RowMatrix<float>::Constant(5, 8, canary);
  RowMatrix<float> dy = RowMatrix<float>::Ones(5, 8);
  REQUIRE_THROWS_WITH(other.backward(dy, dx, ctx), Contains("not recorded by a training forward of this layer"));
  REQUIRE_THROWS_WITH(layer.backward(RowMatrix<float>(RowMatrix<float>::Ones(4, 8)), dx, ctx), Contains("dy is (4, 8), expected (5, 8)"));
  dy(2, 3) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("dy(2, 3)"));
  REQUIRE((dx.array() == canary).all());
}

// ---- always-on banks, capacity, null experts ----------------------------------------------------------

TEST_CASE("MoELayer adds always-on (shared) experts to every token, forward and backward", "[layer][shared]") {
  using SharedBank = moe::experts::Shared<moe::experts::SwiGLU<double>, moe::experts::SigmoidSharedGate>;
  using WithShared = moe::MoELayer<moe::routers::TopKSoftmax<double>, moe::experts::SwiGLU<double>, SharedBank>;
  const MoEConfig cfg{.d_model = 7, .d_ff = 6, .n_experts = 4, .top_k = 2};
  WithShared layer{moe::routers::TopKSoftmax<double>(cfg), moe::experts::SwiGLU<double>(cfg),
                   SharedBank({.d_model = 7, .d_ff = 5, .n_experts = 1, .top_k = 1})};
  layer.init(12);
  REQUIRE(layer.n_experts() == 4);  // the shared expert takes no routed id
  Layer<double> routed_only{moe::routers::TopKSoftmax<double>(cfg), moe::experts::SwiGLU<double>(cfg)};
  routed_only.router() = layer.router();
  routed_only.bank<0>() = layer.bank<0>();

  RowMatrix<double> x = random_tokens<double>(9, 7, 3);
  RowMatrix<double> y(9, 7), y_routed(9, 7), y_shared(9, 7);
  layer.forward(x, y);
  routed_only.forward(x, y_routed);
  {
    moe::Workspace ws(1 << 20);
    moe::Arena arena(ws);
    layer.bank<1>().forward(x, y_shared, arena);
  }
  REQUIRE(y_shared.norm() > 0);
  REQUIRE((y - y_routed - y_shared).cwiseAbs().maxCoeff() <= 1e-14);
  RowMatrix<double> in_place = x;
  layer.forward(in_place, in_place);  // y may alias x with shared experts too
  REQUIRE(in_place == y);

  moe::test::Rng rng(4);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, 9, 7);
  RowMatrix<double> dx(9, 7);
  moe::TrainingContext<double> ctx;
  layer.forward(x, y, ctx);
  layer.zero_grad();
  layer.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(9, 7);
    layer.forward(x, out);
    return (out.array() * r.array()).sum();
  };
  moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  bool saw_shared = false;
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    const auto st = moe::test::check_gradient(name, p, loss, 24);
    if (name.rfind("bank1.", 0) == 0) saw_shared |= st.max_abs_numeric > 1e-4;
  });
  REQUIRE(saw_shared);
}

TEST_CASE("MoELayer reports experts per token and the slots a capacity-limited router dropped", "[layer][capacity]") {
  using Capped = moe::routers::CapacityLimited<moe::routers::TopKSoftmax<float>>;
  const MoEConfig cfg{.d_model = 12, .d_ff = 16, .n_experts = 4, .top_k = 2};
  moe::MoELayer<Capped, moe::experts::SwiGLU<float>> layer(
      Capped(moe::routers::TopKSoftmax<float>(cfg), {.capacity_factor = 0.5}), moe::experts::SwiGLU<float>(cfg));
  layer.init(3);
  RowMatrix<float> x = random_tokens<float>(40, 12, 9);
  x.col(0).setOnes();
  layer.router().visit_parameters([](std::string_view, moe::Parameter<float>& p) { p.value()(0, 0) = 5; });
  RowMatrix<float> y(40, 12);
  const auto res = layer.forward(x, y);
  Index used = 0, dropped_by_id = 0;
  for (Index t = 0; t < 40; ++t) {
    Index active = 0;
    for (Index s = 0; s < 2; ++s) active += res.expert_ids[static_cast<std::size_t>(2 * t + s)] >= 0;
    REQUIRE(res.experts_per_token[static_cast<std::size_t>(t)] == active);
    used += active;
    dropped_by_id += 2 - active;
  }
  REQUIRE(res.dropped_slots > 0);  // capacity ceil(40*2/4*0.5) = 10 per expert, expert 0 is wanted by all
  REQUIRE(res.dropped_slots == dropped_by_id);
  Index routed = 0;
  for (Index c : res.tokens_per_expert) routed += c;
  REQUIRE(routed == used);
}

TEST_CASE("MoELayer runs AdaMoE null experts with top_k above the number of real experts", "[layer][null]") {
  using Null = moe::routers::NullExpertRouter<float>;
  moe::MoELayer<Null, moe::experts::SwiGLU<float>> layer(
      Null({.d_model = 10, .d_ff = 12, .n_experts = 2, .top_k = 3}, {.n_null_experts = 4}),
      moe::experts::SwiGLU<float>({.d_model = 10, .d_ff = 12, .n_experts = 2, .top_k = 1}));
  layer.init(8);
  const RowMatrix<float> x = random_tokens<float>(30, 10, 2);
  RowMatrix<float> y(30, 10);
  const auto res = layer.forward(x, y);
  Index real = 0;
  for (Index n : res.experts_per_token) {
    REQUIRE(n <= 2);
    real += n;
  }
  REQUIRE(real > 0);
  REQUIRE(real < 30 * 3);  // some slots went to null experts
  REQUIRE(y.allFinite());
}

// ---- recurrent banks with sequences -------------------------------------------------------------------

namespace {

// Naive double GRU step (torch.nn.GRUCell formulas), written independently of the bank.
std::vector<double> gru_step(const moe::experts::GRU<double>& bank, Index e, const double* x, const std::vector<double>& h) {
  const Index d = bank.d_model();
  std::vector<double> gi(static_cast<std::size_t>(3 * d)), gh(static_cast<std::size_t>(3 * d)), out(static_cast<std::size_t>(d));
  for (Index i = 0; i < 3 * d; ++i) {
    double a = bank.b_ih(e).data()[i], b = bank.b_hh(e).data()[i];
    for (Index j = 0; j < d; ++j) {
      a += bank.w_ih(e)(i, j) * x[j];
      b += bank.w_hh(e)(i, j) * h[static_cast<std::size_t>(j)];
    }
    gi[static_cast<std::size_t>(i)] = a;
    gh[static_cast<std::size_t>(i)] = b;
  }
  const auto sig = [](double v) { return 1 / (1 + std::exp(-v)); };
  for (Index j = 0; j < d; ++j) {
    const auto u = static_cast<std::size_t>(j), dd = static_cast<std::size_t>(d);
    const double r = sig(gi[u] + gh[u]), z = sig(gi[dd + u] + gh[dd + u]);
    const double n = std::tanh(gi[2 * dd + u] + r * gh[2 * dd + u]);
    out[u] = (1 - z) * n + z * h[u];
  }
  return out;
}

}  // namespace

TEST_CASE("MoELayer carries a GRU expert's state along each sequence of a packed batch", "[layer][gru]") {
  using GRULayer = moe::MoELayer<moe::routers::TopKSoftmax<double>, moe::experts::GRU<double>>;
  const Index d = 6, T = 14;
  GRULayer layer{moe::routers::TopKSoftmax<double>({.d_model = d, .d_ff = 1, .n_experts = 3, .top_k = 1}),
                 moe::experts::GRU<double>({.d_model = d, .d_ff = 1, .n_experts = 3, .top_k = 1})};
  layer.init(5);
  RowMatrix<double> x = random_tokens<double>(T, d, 7);
  const std::vector<Index> starts = {0, 5, 6, 11};  // sequences of 5, 1, 5 and 3 tokens
  RowMatrix<double> y(T, d);
  const auto res = layer.forward(x, y, layer_ws(), starts);

  // Reference: walk the tokens in time order, one state per (expert, sequence), zero at its first token.
  std::map<std::pair<Index, Index>, std::vector<double>> state;
  RowMatrix<double> ref(T, d);
  Index seq = -1;
  bool carried = false;
  for (Index t = 0; t < T; ++t) {
    if (std::find(starts.begin(), starts.end(), t) != starts.end()) ++seq;
    const Index e = res.expert_ids[static_cast<std::size_t>(t)];
    auto [it, fresh] = state.try_emplace({e, seq}, std::vector<double>(static_cast<std::size_t>(d), 0.0));
    carried |= !fresh;
    it->second = gru_step(layer.bank<0>(), e, x.row(t).data(), it->second);
    for (Index j = 0; j < d; ++j) ref(t, j) = res.expert_weights[static_cast<std::size_t>(t)] * it->second[static_cast<std::size_t>(j)];
  }
  REQUIRE(carried);  // some expert saw two tokens of one sequence: the state was carried
  REQUIRE(moe::test::nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size())) <= 1e-24);

  // Without sequences every row starts from zero: a different result.
  RowMatrix<double> y_plain(T, d);
  layer.forward(x, y_plain);
  REQUIRE(y_plain != y);

  // Backpropagation through time inside the layer.
  moe::test::Rng rng(3);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, T, d);
  moe::TrainingContext<double> ctx;
  RowMatrix<double> dx(T, d);
  layer.forward(x, y, ctx, starts);
  layer.zero_grad();
  layer.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(T, d);
    layer.forward(x, out, layer_ws(), starts);
    return (out.array() * r.array()).sum();
  };
  moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    moe::test::check_gradient(name, p, loss, 32);
  });

  using Catch::Matchers::Contains;
  const std::vector<Index> bad = {0, 5, 5};
  REQUIRE_THROWS_WITH(layer.forward(x, y, layer_ws(), bad), Contains("sequence_starts[2] = 5"));
  const std::vector<Index> late = {1};
  REQUIRE_THROWS_WITH(layer.forward(x, y, layer_ws(), late), Contains("sequence_starts[0] = 1"));
}

TEST_CASE("visit_state gives every state buffer by name: the selection bias and a frozen LoRA base", "[layer][state]") {
  const MoEConfig cfg{.d_model = 6, .d_ff = 8, .n_experts = 8, .top_k = 2};
  namespace r = moe::routers;
  namespace e = moe::experts;
  auto v3 = r::presets::deepseek_v3();
  v3.n_groups = 1;
  v3.top_k_groups = 1;
  moe::MoELayer<r::TopKRouter<double>, e::SwiGLU<double>> layer(r::TopKRouter<double>(cfg, v3), e::SwiGLU<double>(cfg));
  layer.init(5);
  std::vector<std::string> names;
  std::span<double> bias;
  layer.visit_state([&](const std::string& name, auto values) {
    names.push_back(name);
    if constexpr (std::is_same_v<decltype(values), std::span<double>>) bias = values;
  });
  REQUIRE(names == std::vector<std::string>{"router.bias"});
  REQUIRE(bias.size() == 8);
  // The visited buffer is the router's: a large bias on expert 7 puts it into every token's choice.
  moe::Rng rng(6);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 10, 6);
  RowMatrix<double> y(10, 6);
  bias[7] = 100;
  const auto res = layer.forward(x, y);
  for (Index t = 0; t < 10; ++t)
    CHECK((res.expert_ids[static_cast<std::size_t>(2 * t)] == 7 ||
           res.expert_ids[static_cast<std::size_t>(2 * t + 1)] == 7));

  // A LoRA bank with a frozen base: its base is state (w1, w3, w2), not a parameter.
  moe::MoELayer<r::TopKSoftmax<double>, e::LoRASwiGLU<double>> lora(cfg);
  names.clear();
  lora.visit_state([&](const std::string& name, auto) { names.push_back(name); });
  REQUIRE(names == std::vector<std::string>{"bank0.w1", "bank0.w3", "bank0.w2"});
}

TEST_CASE("Class template argument deduction: MoELayer layer(router, banks...) names the policies once", "[layer]") {
  const MoEConfig cfg{.d_model = 6, .d_ff = 8, .n_experts = 4, .top_k = 2};
  // Braces: with parentheses, `MoELayer layer(Router(cfg), Bank(cfg));` would declare a function.
  moe::MoELayer layer{moe::routers::TopKSoftmax<float>(cfg), moe::experts::SwiGLU<float>(cfg)};
  static_assert(
      std::is_same_v<decltype(layer), moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::SwiGLU<float>>>);
  moe::MoELayer two(moe::routers::TopKSoftmax<float>({.d_model = 6, .d_ff = 8, .n_experts = 6, .top_k = 2}),
                    moe::experts::SwiGLU<float>(cfg), moe::experts::ZeroExperts<float>(2, 6));
  REQUIRE(two.n_experts() == 6);
  layer.init(1);
  moe::Rng rng(2);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 3, 6);
  RowMatrix<float> y(3, 6);
  REQUIRE(layer.forward(x, y).n_tokens == 3);
}
