// optim/adamw.hpp: torch.optim.AdamW's update by hand, and a small MoE that trains.

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>
#include <moe/optim/adamw.hpp>

#include "optim/one_parameter.hpp"
#include "support/f32_vs_f64.hpp"
#include "support/random.hpp"

using Catch::Matchers::Contains;

TEST_CASE("AdamW follows torch.optim.AdamW for three steps", "[optim]") {
  moe::test::OneParameter model(1.0, 0.5);
  const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
  moe::optim::AdamW<double> adam({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  double p = 1.0, m = 0, v = 0;
  const double grads[] = {0.5, -0.25, 2.0};
  for (int t = 1; t <= 3; ++t) {
    const double g = grads[t - 1];
    model.p.grad()(0, 0) = g;
    adam.step(model);
    p *= 1 - lr * wd;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    p -= lr * (m / (1 - std::pow(b1, t))) / (std::sqrt(v / (1 - std::pow(b2, t))) + eps);
    CHECK(model.value() == Approx(p).epsilon(1e-12));
  }
  CHECK(adam.steps() == 3);
  CHECK(model.value() != 1.0);
}

TEST_CASE("AdamWConfig is validated", "[optim][error]") {
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.lr = -1}), Contains("lr = -1"));
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.beta2 = 1.0}), Contains("beta2 = 1"));
  REQUIRE_THROWS_WITH(moe::optim::AdamW<float>({.eps = 0}), Contains("eps = 0"));
}

TEST_CASE("AdamW trains a small MoE layer to fit a linear map", "[optim][layer]") {
  moe::MixtralMoEType<double> layer({.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  layer.init(1);
  moe::Rng rng(2);
  const moe::RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 64, 8);
  const moe::RowMatrix<double> target = x * moe::test::normal_matrix<double>(rng, 8, 8, 0.5);
  moe::optim::AdamW<double> adam({.lr = 1e-2, .weight_decay = 0});
  moe::TrainingContext<double> ctx;
  moe::RowMatrix<double> y(64, 8), dx(64, 8);
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    layer.zero_grad();
    layer.forward(x, y, ctx);
    const moe::RowMatrix<double> diff = y - target;
    const double loss = diff.squaredNorm() / double(diff.size());
    (step == 0 ? first : last) = loss;
    layer.backward(moe::RowMatrix<double>(2.0 * diff / double(diff.size())), dx, ctx);
    adam.step(layer);
  }
  INFO("loss " << first << " -> " << last);
  REQUIRE(last < 0.2 * first);
}

// Copies every state buffer of `from` into `to` (names and sizes must match, in order): a stand-in for a
// checkpoint save and load through visit_state.
template <class From, class To>
void copy_state(From&& from_visit, To&& to_visit) {
  std::vector<std::pair<std::string, std::vector<double>>> floats;
  std::vector<std::pair<std::string, std::int64_t>> counters;
  from_visit([&](const std::string& name, auto values) {
    if constexpr (std::is_same_v<typename decltype(values)::value_type, std::int64_t>)
      counters.emplace_back(name, values[0]);
    else
      floats.emplace_back(name, std::vector<double>(values.begin(), values.end()));
  });
  std::size_t f = 0, c = 0;
  to_visit([&](const std::string& name, auto values) {
    if constexpr (std::is_same_v<typename decltype(values)::value_type, std::int64_t>) {
      REQUIRE(counters.at(c).first == name);
      values[0] = counters.at(c++).second;
    } else {
      REQUIRE(floats.at(f).first == name);
      REQUIRE(floats.at(f).second.size() == values.size());
      std::copy(floats.at(f).second.begin(), floats.at(f).second.end(), values.begin());
      ++f;
    }
  });
  REQUIRE(f == floats.size());
  REQUIRE(c == counters.size());
}

TEST_CASE("AdamW and SGD resume exactly from their visit_state (moments, momentum and step)", "[optim][state]") {
  const moe::MoEConfig cfg{.d_model = 6, .d_ff = 8, .n_experts = 4, .top_k = 2};
  moe::Rng rng(3);
  const moe::RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 20, 6);
  const moe::RowMatrix<double> dy = moe::test::normal_matrix<double>(rng, 20, 6);
  const auto train_step = [&](moe::MixtralMoEType<double>& layer, auto& opt) {
    moe::TrainingContext<double> ctx;
    moe::RowMatrix<double> y(20, 6), dx(20, 6);
    layer.zero_grad();
    layer.forward(x, y, ctx);
    layer.backward(dy, dx, ctx);
    opt.step(layer);
  };
  const auto weights = [](moe::MixtralMoEType<double>& layer) {
    std::vector<double> w;
    layer.visit_parameters([&](const std::string&, const moe::Parameter<double>& p) {
      w.insert(w.end(), p.data(), p.data() + p.rows() * p.cols());
    });
    return w;
  };
  const auto check = [&](auto make_optimizer, const char* what) {
    INFO(what);
    moe::MixtralMoEType<double> a(cfg), b(cfg);
    a.init(4);
    auto opt_a = make_optimizer();
    for (int s = 0; s < 3; ++s) train_step(a, opt_a);
    // b: a's weights and a fresh optimizer given a's state; c: a's weights and a fresh optimizer alone.
    moe::MixtralMoEType<double> c(cfg);
    b.init(4);
    c.init(4);
    moe::test::copy_parameters(a, b);
    moe::test::copy_parameters(a, c);
    auto opt_b = make_optimizer(), opt_c = make_optimizer();
    copy_state([&](auto&& f) { opt_a.visit_state(a, f); }, [&](auto&& f) { opt_b.visit_state(b, f); });
    train_step(a, opt_a);
    train_step(b, opt_b);
    train_step(c, opt_c);
    REQUIRE(weights(a) == weights(b));  // bitwise: the resumed step is the step
    REQUIRE(weights(a) != weights(c));  // and without the state it is not (the check can fail)
  };
  check([] { return moe::optim::AdamW<double>({.lr = 1e-2}); }, "AdamW");
  check([] { return moe::optim::SGD<double>({.lr = 1e-2, .momentum = 0.9}); }, "SGD with momentum");
}
