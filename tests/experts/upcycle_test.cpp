// experts/upcycle.hpp: every expert a bitwise copy of the source expert (weights and biases), the upcycled
// layer's first forward equal to the dense bank's output under a renormalised top-2 router (and not under an
// unnormalised one: the requirement is real), the relative noise, the staged schedule (router only, then all)
// and bad input.

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/banks.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

template <class T>
using Bank = moe::experts::FFN<T, moe::kernels::SiLU, true>;

template <class T>
Bank<T> trained_source(Index n_experts) {
  Bank<T> source({.d_model = 24, .d_ff = 40, .n_experts = n_experts, .top_k = 1}, {.bias = true});
  moe::Rng rng(3);
  source.init(rng);
  return source;
}

// Rows [e * rows, (e + 1) * rows) of every parameter of `bank`, as (name, values) in visit order.
template <class T>
std::vector<std::pair<std::string, RowMatrix<T>>> expert_parameters(const Bank<T>& bank, Index e) {
  std::vector<std::pair<std::string, RowMatrix<T>>> out;
  bank.visit_parameters([&](std::string_view name, const moe::Parameter<T>& p) {
    const Index rows = p.rows() / bank.n_experts();
    out.emplace_back(std::string(name), moe::detail::eigen(p.value()).middleRows(e * rows, rows));
  });
  return out;
}

template <class T>
void check_first_forward_equals_dense(double bound) {
  const Bank<T> source = trained_source<T>(1);
  const moe::MoEConfig cfg{.d_model = 24, .d_ff = 40, .n_experts = 5, .top_k = 2};
  moe::test::Rng rng(8);
  const RowMatrix<T> x = moe::test::normal_matrix<T>(rng, 37, cfg.d_model);
  const RowMatrix<T> dense = moe::test::bank_forward(source, x, {0, x.rows()});
  const auto moe_output = [&](const moe::routers::TopKOptions& options) {
    moe::MoELayer layer(moe::routers::TopKRouter<T>(cfg, options), moe::experts::upcycle(source, cfg));
    moe::Rng init(5);
    layer.router().init(init);  // a fresh gate, as MoE-LLaVA's
    RowMatrix<T> y(x.rows(), x.cols());
    layer.forward(x, y);
    return y;
  };
  const RowMatrix<T> y = moe_output(moe::routers::presets::mixtral());
  REQUIRE(dense.norm() > 0);
  CHECK((y - dense).cwiseAbs().maxCoeff() <= bound * dense.cwiseAbs().maxCoeff());
  // Control: top-2 weights that do not sum to 1 scale the output, so the equality above is not automatic.
  const RowMatrix<T> unnormalised = moe_output(moe::routers::presets::qwen2_moe());
  CHECK((unnormalised - dense).cwiseAbs().maxCoeff() > 1e-2 * dense.cwiseAbs().maxCoeff());
}

}  // namespace

TEST_CASE("upcycle copies the source expert bit for bit into every expert", "[expert][upcycle]") {
  const Bank<float> source = trained_source<float>(3);
  const auto before = expert_parameters(source, 2);
  const moe::MoEConfig cfg{.d_model = 24, .d_ff = 40, .n_experts = 4, .top_k = 2};
  const Bank<float> bank = moe::experts::upcycle(source, cfg, {.source_expert = 2});
  CHECK(bank.n_experts() == 4);
  CHECK(bank.has_bias());
  for (Index e = 0; e < 4; ++e) {
    const auto copy = expert_parameters(bank, e);
    REQUIRE(copy.size() == 6);  // w1, w3, w2, b1, b3, b2
    for (std::size_t i = 0; i < copy.size(); ++i) {
      INFO("expert " << e << ", " << copy[i].first);
      CHECK(copy[i].first == before[i].first);
      CHECK(copy[i].second == before[i].second);
    }
  }
  CHECK(expert_parameters(source, 2) == before);  // only read
}

TEST_CASE("The upcycled layer's first forward equals the dense layer under a renormalised top-k router",
          "[expert][upcycle]") {
  check_first_forward_equals_dense<float>(1e-6);
  check_first_forward_equals_dense<double>(1e-14);
}

TEST_CASE("upcycle's noise perturbs each weight matrix by noise x its rms and leaves the biases", "[expert][upcycle]") {
  const Bank<double> source = trained_source<double>(1);
  const auto dense = expert_parameters(source, 0);
  const moe::MoEConfig cfg{.d_model = 24, .d_ff = 40, .n_experts = 3, .top_k = 1};
  const Bank<double> bank = moe::experts::upcycle(source, cfg, {.noise = 0.1, .seed = 4});
  std::vector<RowMatrix<double>> first;
  for (Index e = 0; e < 3; ++e) {
    const auto copy = expert_parameters(bank, e);
    for (std::size_t i = 0; i < copy.size(); ++i) {
      INFO("expert " << e << ", " << copy[i].first);
      const RowMatrix<double> diff = copy[i].second - dense[i].second;
      if (copy[i].first[0] == 'b') {
        CHECK(diff.norm() == 0);
      } else {
        // rms(diff) / rms(w) estimates 0.1 from >= 960 draws: within 20 % with overwhelming probability.
        const double ratio = diff.norm() / dense[i].second.norm();
        CHECK(ratio == Approx(0.1).epsilon(0.2));
      }
      if (e == 0) first.push_back(copy[i].second);
      if (e > 0 && copy[i].first[0] == 'w') CHECK(copy[i].second != first[i]);  // experts differ
    }
  }
}

TEST_CASE("Staged upcycling: a router-only step leaves the experts, then a full step moves them", "[expert][upcycle]") {
  const Bank<double> source = trained_source<double>(1);
  const moe::MoEConfig cfg{.d_model = 24, .d_ff = 40, .n_experts = 4, .top_k = 2};
  moe::MoELayer layer(moe::routers::TopKRouter<double>(cfg), moe::experts::upcycle(source, cfg));
  moe::Rng init(6);
  layer.router().init(init);
  moe::test::Rng rng(9);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 32, cfg.d_model);
  const RowMatrix<double> dy = moe::test::normal_matrix<double>(rng, 32, cfg.d_model);
  const auto step = [&](auto& optimizer, auto& target) {
    RowMatrix<double> y(32, cfg.d_model), dx(32, cfg.d_model);
    moe::TrainingContext<double> ctx;
    layer.zero_grad();
    layer.forward(x, y, ctx);
    layer.backward(dy, dx, ctx);
    optimizer.step(target);
  };
  const auto experts_before = expert_parameters(std::as_const(layer).bank<0>(), 1);
  const RowMatrix<double> gate_before = moe::detail::eigen(std::as_const(layer).router().gate());
  moe::optim::AdamW<double> router_only({.lr = 1e-2});
  moe::optim::ParameterGroup router(layer, "router.");
  step(router_only, router);
  CHECK(expert_parameters(std::as_const(layer).bank<0>(), 1) == experts_before);
  CHECK(moe::detail::eigen(std::as_const(layer).router().gate()) != gate_before);
  moe::optim::AdamW<double> all({.lr = 1e-2});
  step(all, layer);
  CHECK(expert_parameters(std::as_const(layer).bank<0>(), 1) != experts_before);
}

TEST_CASE("upcycle rejects a shape that differs from the source, a missing expert and bad noise",
          "[expert][upcycle][bad_input]") {
  const Bank<float> source = trained_source<float>(2);
  const auto rejects = [&](const moe::MoEConfig& cfg, const moe::experts::UpcycleOptions& options,
                           const std::string& what) {
    INFO(what);
    CHECK_THROWS_WITH(moe::experts::upcycle(source, cfg, options), Catch::Contains(what));
  };
  const moe::MoEConfig ok{.d_model = 24, .d_ff = 40, .n_experts = 4, .top_k = 2};
  rejects({.d_model = 25, .d_ff = 40, .n_experts = 4, .top_k = 2}, {}, "d_model 25");
  rejects({.d_model = 24, .d_ff = 41, .n_experts = 4, .top_k = 2}, {}, "d_ff 41");
  rejects(ok, {.source_expert = 2}, "options.source_expert = 2 of 2");
  rejects(ok, {.source_expert = -1}, "options.source_expert = -1");
  rejects(ok, {.noise = -0.5}, "options.noise = -0.5");
  rejects(ok, {.noise = std::numeric_limits<double>::quiet_NaN()}, "options.noise = nan");
  rejects({.d_model = 24, .d_ff = 40, .n_experts = 0, .top_k = 1}, {}, "n_experts");
}
