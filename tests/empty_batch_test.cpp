// RELIABILITY.md B5: an empty batch (T = 0) forward, training forward, backward and route() return at once
// with an empty result, leave every gradient bitwise as it was and allocate nothing (global operator new is
// counted; not under the sanitizers, whose runtimes replace it); a single token (T = 1) matches the
// references, forward (naive double layer) and backward (finite differences in double; f32 vs double).

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/detail/eigen_view.hpp>
#include <moe/moe.hpp>
#include <moe/reference/naive_moe.hpp>

#include "support/counting_new.hpp"
#include "support/f32_vs_f64.hpp"
#include "support/gradcheck.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::MoEConfig;
using moe::RowMatrix;


namespace {

// Every parameter gradient of the layer, concatenated.
template <class Layer>
std::vector<float> gradients(Layer& layer) {
  std::vector<float> g;
  layer.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    g.insert(g.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
  });
  return g;
}

// Runs the T = 0 calls on `layer` and checks them; returns the allocations of a training forward and backward
// on a TrainingContext that never held anything (checked by the caller).
template <class Layer>
long check_empty_batch(const char* name, Layer& layer) {
  INFO(name);
  const Index d = layer.d_model();
  // A real step first: non-zero gradients to keep, warm workspaces and contexts that remember 20 tokens.
  moe::test::Rng rng(5);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 20, d), dy = moe::test::normal_matrix<float>(rng, 20, d);
  RowMatrix<float> y(20, d), dx(20, d);
  moe::TrainingContext<float> used;
  layer.zero_grad();
  layer.forward(x, y, used);
  layer.backward(dy, dx, used);
  const std::vector<float> before = gradients(layer);
  REQUIRE(std::any_of(before.begin(), before.end(), [](float g) { return g != 0.0f; }));

  const RowMatrix<float> x0(0, d), dy0(0, d);
  RowMatrix<float> y0(0, d), dx0(0, d);
  moe::Workspace fresh_ws;
  moe::TrainingContext<float> fresh;
  std::vector<moe::ForwardResult<float>> results;
  results.reserve(4);  // no allocation inside the counted regions
  // Inference: a Workspace that never held anything.
  long start = moe::test::operator_new_calls.load();
  results.push_back(layer.forward(x0, y0, fresh_ws));
  results.push_back(std::as_const(layer).route(x0, fresh_ws));
  const long inference = moe::test::operator_new_calls.load() - start;
  // Training on a context that held 20 tokens.
  start = moe::test::operator_new_calls.load();
  results.push_back(layer.forward(x0, y0, used));
  layer.backward(dy0, dx0, used);
  const long on_used_context = moe::test::operator_new_calls.load() - start;
  // Training on a context that never held anything.
  start = moe::test::operator_new_calls.load();
  results.push_back(layer.forward(x0, y0, fresh));
  layer.backward(dy0, dx0, fresh);
  const long on_fresh_context = moe::test::operator_new_calls.load() - start;

  if (MOE_TEST_COUNTS_NEW) {
    CHECK(inference == 0);
    CHECK(on_used_context == 0);
  }
  CHECK(fresh_ws.allocations() == 0);
  CHECK(fresh_ws.capacity() == 0);
  for (const auto& r : results) {
    CHECK(r.n_tokens == 0);
    CHECK(r.expert_ids.empty());
    CHECK(r.expert_weights.empty());
    CHECK(r.experts_per_token.empty());
    CHECK(r.dropped_slots == 0);
    CHECK(r.n_aux_losses == 0);
    CHECK(r.aux_loss == 0.0);
  }
  CHECK(fresh.n_tokens() == 0);
  CHECK(used.n_tokens() == 0);
  const std::vector<float> after = gradients(layer);
  REQUIRE(after.size() == before.size());
  CHECK(std::memcmp(after.data(), before.data(), sizeof(float) * before.size()) == 0);  // unchanged, bitwise
  return on_fresh_context;
}

// Calls f(name, layer) for each layer B5 runs: Mixtral; capacity limit, balance losses and a shared expert;
// GRU experts.
template <class F>
void for_each_layer(F&& f) {
  const MoEConfig cfg{.d_model = 16, .d_ff = 24, .n_experts = 4, .top_k = 2};
  moe::MixtralMoE mixtral(cfg);
  mixtral.init(1);
  f("Mixtral", mixtral);

  using Balanced = moe::routers::WithLosses<moe::routers::TopKRouter<float>, moe::losses::SwitchLoss, moe::losses::ZLoss>;
  using Router = moe::routers::CapacityLimited<Balanced>;
  using SharedBank = moe::experts::Shared<moe::experts::SwiGLU<float>, moe::experts::SigmoidSharedGate>;
  moe::MoELayer<Router, moe::experts::SwiGLU<float>, SharedBank> capped(
      Router(Balanced(moe::routers::TopKRouter<float>(cfg), moe::losses::SwitchLoss{}, moe::losses::ZLoss{}),
             {.capacity_factor = 1.0}),
      moe::experts::SwiGLU<float>(cfg), SharedBank({.d_model = 16, .d_ff = 8, .n_experts = 1, .top_k = 1}));
  capped.init(2);
  f("capacity, losses and a shared expert", capped);

  const MoEConfig gru_cfg{.d_model = 16, .d_ff = 1, .n_experts = 4, .top_k = 1};
  moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::GRU<float>> gru{
      moe::routers::TopKSoftmax<float>(gru_cfg, {.renormalize = false}), moe::experts::GRU<float>(gru_cfg)};
  gru.init(3);
  f("GRU", gru);
}

}  // namespace

TEST_CASE("B5: zero tokens forward and backward return at once, change no gradient and allocate nothing",
          "[layer][empty]") {
  for_each_layer([](const char* name, auto& layer) { check_empty_batch(name, layer); });
}

#if MOE_TEST_COUNTS_NEW
// A context's first forward used to record the parameters' versions before returning for T = 0 (3 or 4
// allocations here); an empty batch now records nothing, and backward on 0 tokens checks nothing.
TEST_CASE("B5: zero tokens on a fresh TrainingContext allocate nothing", "[layer][empty]") {
  for_each_layer([](const char* name, auto& layer) {
    const long on_fresh_context = check_empty_batch(name, layer);
    INFO(name);
    CHECK(on_fresh_context == 0);
  });
}
#endif

TEST_CASE("B5: one token matches the naive double reference (forward)", "[layer][empty]") {
  struct Shape {
    Index d_model, d_ff, n_experts, top_k;
  };
  for (const Shape s : {Shape{16, 32, 8, 2}, Shape{17, 33, 1, 1}, Shape{9, 7, 4, 4}, Shape{31, 65, 16, 3}}) {
    const MoEConfig cfg{.d_model = s.d_model, .d_ff = s.d_ff, .n_experts = s.n_experts, .top_k = s.top_k};
    INFO("d=" << s.d_model << " ff=" << s.d_ff << " E=" << s.n_experts << " k=" << s.top_k);
    for (const std::uint64_t seed : {1, 2, 3}) {
      moe::MixtralMoE layer(cfg);
      layer.init(seed);
      moe::test::Rng rng(seed + 10);
      const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 1, s.d_model);
      RowMatrix<float> y(1, s.d_model);
      moe::Workspace ws;
      const auto res = layer.forward(x, y, ws);
      std::vector<std::vector<Index>> chosen;
      const RowMatrix<double> ref = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<float>(x), &chosen);
      // Consecutive logits of the reference up to the (k+1)-th are further apart than the f32 logits' error
      // bounds gamma_d sum |g x| plus 3 eps_softmax (10 eps32, RELIABILITY N3), so the selection and its slot
      // order must agree on any instruction set.
      const auto gate = moe::detail::eigen(layer.router().gate());
      std::vector<std::pair<double, double>> z;  // (logit, bound)
      for (Index e = 0; e < s.n_experts; ++e) {
        double v = 0, m = 0;
        for (Index j = 0; j < s.d_model; ++j) {
          v += double(gate(e, j)) * double(x(0, j));
          m += std::abs(double(gate(e, j)) * double(x(0, j)));
        }
        z.emplace_back(v, moe::test::gamma_n<float>(static_cast<double>(s.d_model)) * m);
      }
      std::sort(z.begin(), z.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      for (Index r = 0; r + 1 < std::min(s.n_experts, s.top_k + 1); ++r) {
        const auto& [za, ea] = z[static_cast<std::size_t>(r)];
        const auto& [zb, eb] = z[static_cast<std::size_t>(r + 1)];
        REQUIRE(za - zb > ea + eb + 3 * 10 * 0x1.0p-23);
      }
      REQUIRE(res.n_tokens == 1);
      for (Index slot = 0; slot < s.top_k; ++slot)
        REQUIRE(res.expert_ids[static_cast<std::size_t>(slot)] == chosen[0][static_cast<std::size_t>(slot)]);
      REQUIRE(ref.norm() > 0);
      CHECK(moe::test::nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size())) <= 1e-7);
    }
  }
}

TEST_CASE("B5: one token backward matches finite differences (double) and the double backward (f32)",
          "[layer][empty][grad]") {
  const MoEConfig cfg{.d_model = 7, .d_ff = 9, .n_experts = 5, .top_k = 2};
  moe::MixtralMoEType<double> ld(cfg);
  ld.init(12);
  moe::test::Rng rng(13);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 1, 7);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, 1, 7);
  // Away from the top-k boundary: the 2nd and 3rd logits differ by >= 1e-3 (>> the probe step 1e-6).
  RowMatrix<double> logits = x * moe::detail::eigen(ld.router().gate()).transpose();
  std::vector<double> z(logits.data(), logits.data() + 5);
  std::sort(z.begin(), z.end(), std::greater<>());
  REQUIRE(z[1] - z[2] >= 1e-3);

  RowMatrix<double> y(1, 7), dx(1, 7);
  moe::TrainingContext<double> ctx;
  ld.forward(x, y, ctx);
  ld.zero_grad();
  ld.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(1, 7);
    ld.forward(x, out);
    return (out.array() * r.array()).sum();
  };
  double biggest = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss).max_abs_numeric;
  ld.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    biggest = std::max(biggest, moe::test::check_gradient(name, p, loss, 48).max_abs_numeric);
  });
  CHECK(biggest > 1e-3);

  // f32 on the same weights (ld's rounded to f32) and token against the double backward (G4: NMSE <= 1e-7).
  moe::MixtralMoE lf(cfg);
  moe::test::copy_parameters(ld, lf);
  moe::test::check_backward_against_double(lf, ld, RowMatrix<float>(x.cast<float>()), RowMatrix<float>(r.cast<float>()),
                                           1e-7);
}
