// moe::Model of mixed layers (dense, Mixtral-style, DeepSeek-style) and moe::DenseLayer: the forward is the hand
// composition of the layers' forwards with residuals (bitwise); input and parameter gradients match central
// finite differences in double; names are hierarchical and unique, so one AdamW keeps separate moments for two
// equal-shaped layers (bitwise those of two separate AdamWs); the DeepSeek-V3 selection bias is state under its
// full name and a checkpoint round-trips the model; clear errors.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"

using Catch::Matchers::Contains;
using moe::Index;
using moe::RowMatrix;
namespace routers = moe::routers;

namespace {

template <class T>
using Dense = moe::DenseLayer<moe::DeepSeekMoEShared<T>>;  // one SwiGLU MLP, always on
template <class T>
using Mixtral = moe::MixtralMoEType<T>;
template <class T>
using DeepSeek = moe::DeepSeekMoEType<T>;
template <class T>
using Mixed = moe::Model<Dense<T>, Mixtral<T>, DeepSeek<T>>;

template <class T>
Dense<T> dense(Index d) {
  return Dense<T>(moe::MoEConfig{.d_model = d, .d_ff = 10, .n_experts = 1, .top_k = 1});
}
template <class T>
Mixtral<T> mixtral(Index d) {
  return Mixtral<T>(moe::MoEConfig{.d_model = d, .d_ff = 5, .n_experts = 4, .top_k = 2});
}
// DeepSeek-V3's routing (sigmoid, selection bias, group-limited top-k, × 2.5) on 8 experts in 4 groups of 2.
routers::TopKOptions v3_small() {
  routers::TopKOptions o = routers::presets::deepseek_v3();
  o.n_groups = 4;
  o.top_k_groups = 2;
  return o;
}
template <class T>
DeepSeek<T> deepseek(Index d) {
  return moe::make_deepseek_moe<T>({.d_model = d, .d_ff = 3, .n_experts = 8, .top_k = 2}, 6, v3_small());
}

// Sets every state buffer (here: the selection bias) to N(0, scale^2) values.
template <class Model>
void randomize_state(Model& m, std::uint64_t seed, double scale) {
  moe::Rng rng(seed);
  m.visit_state([&](const std::string&, auto values) {
    for (auto& v : values) v = static_cast<std::remove_reference_t<decltype(v)>>(scale * rng.normal());
  });
}

// Every parameter value of a model, in visit order.
template <class Model>
std::vector<double> flatten(Model& m) {
  std::vector<double> all;
  m.visit_parameters([&](const std::string&, auto& p) {
    for (Index i = 0; i < p.rows() * p.cols(); ++i) all.push_back(double(std::as_const(p).data()[i]));
  });
  return all;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moe_model_test_" + name)).string();
}

}  // namespace

TEST_CASE("Model: forward is the hand composition of its layers with residuals, bitwise", "[model]") {
  constexpr Index d = 16, n = 13;
  Mixed<float> model(dense<float>(d), mixtral<float>(d), deepseek<float>(d), mixtral<float>(d));
  model.init(3);
  randomize_state(model, 4, 0.5);
  REQUIRE(model.n_layers() == 4);
  moe::test::Rng rng(5);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n, d);

  // By hand: h_{l+1} = h_l + layer_l(h_l), each layer run on its own.
  std::vector<RowMatrix<float>> h{x};
  RowMatrix<float> out(n, d);
  moe::Workspace ws;
  const auto step = [&](const auto& layer) {
    layer.forward(h.back(), out, ws);
    h.push_back(h.back() + out);
  };
  step(model.layer<Dense<float>>(0));
  step(model.layer<Mixtral<float>>(1));
  step(model.layer<DeepSeek<float>>(2));
  step(model.layer<Mixtral<float>>(3));
  REQUIRE((h[4] - x).norm() > 0.1 * x.norm());  // every layer contributes something

  moe::Workspace model_ws;
  RowMatrix<float> y(n, d);
  CHECK(model.forward(x, y, model_ws) == 0.0);  // no aux losses in these presets
  CHECK(y == h[4]);
  CHECK(model_ws.capacity() == model.workspace_bytes(n));
  model.forward(x, y, model_ws);  // warm: no allocation
  CHECK(model_ws.allocations() == 1);

  typename Mixed<float>::Context ctx;
  RowMatrix<float> y_train(n, d);
  model.forward(x, y_train, ctx);
  CHECK(y_train == h[4]);
  REQUIRE(ctx.n_layers() == 4);
  for (std::size_t l = 0; l <= 4; ++l) {
    INFO("h_" << l);
    CHECK(moe::detail::eigen(ctx.hidden(l)) == h[l]);
  }
  CHECK(ctx.result(0).n_tokens == n);  // dense: no routing
  CHECK(ctx.result(0).expert_ids.empty());
  CHECK(ctx.result(2).expert_ids.size() == std::size_t(n * 2));

  RowMatrix<float> inplace = x;  // y may be x
  model.forward(inplace, inplace, model_ws);
  CHECK(inplace == h[4]);
}

TEST_CASE("Model: gradients of a mixed model match finite differences in double", "[model][grad]") {
  constexpr Index d = 5, n = 7;
  Mixed<double> model(dense<double>(d), mixtral<double>(d), deepseek<double>(d));
  model.init(11);
  randomize_state(model, 12, 0.3);
  moe::test::Rng rng(13);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n, d);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, n, d);

  typename Mixed<double>::Context ctx;
  RowMatrix<double> y(n, d), dx(n, d);
  model.zero_grad();
  model.forward(x, y, ctx);
  model.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(n, d);
    model.forward(x, out);
    return (out.array() * r.array()).sum();
  };
  const auto dx_stats = moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  CHECK(dx_stats.max_abs_numeric > 1e-2);
  double max_error = dx_stats.max_abs_error;
  std::map<std::string, double> biggest;  // per layer: the largest numeric gradient checked
  std::vector<std::string> names;
  model.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    const auto s = moe::test::check_gradient(name, p, loss, 16);
    max_error = std::max(max_error, s.max_abs_error);
    const std::string layer = name.substr(0, name.find(".mlp."));
    biggest[layer] = std::max(biggest[layer], s.max_abs_numeric);
    names.push_back(name);
  });
  // Every layer type took part: the dense MLP, Mixtral's gate and experts, DeepSeek's gate, routed and shared experts.
  for (const char* name :
       {"layers.0.mlp.bank0.w1", "layers.0.mlp.bank0.w2", "layers.1.mlp.router.gate", "layers.1.mlp.bank0.w3",
        "layers.2.mlp.router.gate", "layers.2.mlp.bank0.w2", "layers.2.mlp.bank1.w1"})
    CHECK(std::count(names.begin(), names.end(), name) == 1);
  for (const auto& [layer, g] : biggest) {
    INFO(layer);
    CHECK(g > 1e-3);  // not vacuous
  }
  INFO("largest |analytic - numeric|: " << max_error);
  CHECK(max_error < 1e-6);
}

TEST_CASE("Model: hierarchical unique names; one AdamW keeps the moments of equal-shaped layers apart",
          "[model][optim]") {
  constexpr Index d = 8, n = 11;
  Mixed<float> model(dense<float>(d), mixtral<float>(d), mixtral<float>(d));
  model.init(21);
  // Layers 1 and 2 have one shape and start identical.
  model.layer<Mixtral<float>>(1).init(22);
  model.layer<Mixtral<float>>(2).init(22);

  std::vector<std::string> names;
  model.visit_parameters([&](const std::string& name, moe::Parameter<float>&) { names.push_back(name); });
  CHECK(names == std::vector<std::string>{"layers.0.mlp.bank0.w1", "layers.0.mlp.bank0.w3", "layers.0.mlp.bank0.w2",
                                          "layers.1.mlp.router.gate", "layers.1.mlp.bank0.w1", "layers.1.mlp.bank0.w3",
                                          "layers.1.mlp.bank0.w2", "layers.2.mlp.router.gate", "layers.2.mlp.bank0.w1",
                                          "layers.2.mlp.bank0.w3", "layers.2.mlp.bank0.w2"});
  CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());

  // The reference: each equal-shaped layer alone, with its own AdamW, fed the model's gradients.
  const moe::optim::AdamWConfig cfg{.lr = 1e-2, .weight_decay = 0.1};
  moe::optim::AdamW<float> opt(cfg), opt1(cfg), opt2(cfg);
  Mixtral<float> alone1 = mixtral<float>(d), alone2 = mixtral<float>(d);
  alone1.init(22);
  alone2.init(22);
  moe::test::Rng rng(23);
  typename Mixed<float>::Context ctx;
  RowMatrix<float> y(n, d), dx(n, d);
  for (int step = 0; step < 2; ++step) {
    const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n, d),
                           dy = moe::test::normal_matrix<float>(rng, n, d);
    model.zero_grad();
    model.forward(x, y, ctx);
    model.backward(dy, dx, ctx);
    std::map<std::string, moe::Parameter<float>*> params;
    model.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) { params[name] = &p; });
    const auto feed = [&](Mixtral<float>& alone, const std::string& prefix) {
      alone.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) {
        moe::Parameter<float>& q = *params.at(prefix + name);
        const float* w = std::as_const(q).data();
        REQUIRE(std::equal(w, w + q.rows() * q.cols(), std::as_const(p).data()));  // same weights
        moe::detail::eigen(p.grad()) = moe::detail::eigen(q.grad());
      });
    };
    feed(alone1, "layers.1.mlp.");
    feed(alone2, "layers.2.mlp.");
    opt.step(model);
    opt1.step(alone1);
    opt2.step(alone2);
  }

  std::map<std::string, std::vector<float>> state, state1, state2;
  const auto collect = [](std::map<std::string, std::vector<float>>& into, const std::string& prefix) {
    return [&into, prefix](const std::string& name, auto values) {
      if constexpr (std::is_same_v<typename decltype(values)::value_type, float>)
        into[prefix + name].assign(values.begin(), values.end());
    };
  };
  opt.visit_state(model, collect(state, ""));
  opt1.visit_state(alone1, collect(state1, "layers.1.mlp."));
  opt2.visit_state(alone2, collect(state2, "layers.2.mlp."));
  CHECK(state.size() == 2 * names.size());  // exp_avg and exp_avg_sq of every parameter, none shared
  bool moments_differ = false;
  for (const auto* one : {&state1, &state2})
    for (const auto& [name, values] : *one) {
      INFO(name);
      REQUIRE(state.count(name) == 1);
      CHECK(state.at(name) == values);  // bitwise what a separate AdamW holds
    }
  for (const auto& [name, values] : state1) {
    const std::string other = "layers.2" + name.substr(std::string("layers.1").size());
    moments_differ |= values != state.at(other);
  }
  CHECK(moments_differ);  // the two layers got different gradients, and kept different moments
  // And the weights stepped as the separate layers' did.
  std::vector<float> w1, w2;
  model.visit_parameters([&](const std::string& name, moe::Parameter<float>& p) {
    auto& into = name.rfind("layers.1.", 0) == 0 ? w1 : w2;
    if (name.rfind("layers.0.", 0) != 0)
      into.insert(into.end(), std::as_const(p).data(), std::as_const(p).data() + p.rows() * p.cols());
  });
  std::vector<float> a1, a2;
  alone1.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    a1.insert(a1.end(), std::as_const(p).data(), std::as_const(p).data() + p.rows() * p.cols());
  });
  alone2.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    a2.insert(a2.end(), std::as_const(p).data(), std::as_const(p).data() + p.rows() * p.cols());
  });
  CHECK(w1 == a1);
  CHECK(w2 == a2);
  CHECK(w1 != w2);
}

TEST_CASE("Model: the selection bias is state under its full name; checkpoints round-trip the model", "[model][io]") {
  constexpr Index d = 8, n = 17;
  const auto make = [&](std::uint64_t seed) {
    Mixed<float> m(dense<float>(d), mixtral<float>(d), deepseek<float>(d));
    m.init(seed);
    return m;
  };
  Mixed<float> a = make(31);
  std::vector<std::string> state_names;
  a.visit_state([&](const std::string& name, auto values) {
    state_names.push_back(name);
    CHECK(values.size() == 8);
  });
  CHECK(state_names == std::vector<std::string>{"layers.2.mlp.router.bias"});
  randomize_state(a, 32, 1.0);
  // The state visitor reaches the router's own buffer.
  std::vector<float> seen, own;
  a.visit_state([&](const std::string&, auto values) { seen.assign(values.begin(), values.end()); });
  a.layer<DeepSeek<float>>(2).router().visit_state(
      [&](std::string_view, auto values) { own.assign(values.begin(), values.end()); });
  CHECK(seen == own);
  CHECK(std::any_of(own.begin(), own.end(), [](float v) { return v != 0; }));

  // One AdamW step, so the checkpoint carries moments too.
  moe::test::Rng rng(33);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n, d);
  typename Mixed<float>::Context ctx;
  RowMatrix<float> y(n, d), dx(n, d);
  moe::optim::AdamW<float> opt({});
  a.forward(x, y, ctx);
  a.backward(moe::test::normal_matrix<float>(rng, n, d), dx, ctx);
  opt.step(a);

  const auto path = temp_path("mixed.safetensors");
  moe::io::save_checkpoint(a, opt, path);
  Mixed<float> b = make(99);
  moe::optim::AdamW<float> opt_b({});
  REQUIRE(flatten(a) != flatten(b));
  moe::io::load_checkpoint(b, opt_b, path);
  CHECK(flatten(a) == flatten(b));
  std::vector<float> bias_b;
  b.visit_state([&](const std::string&, auto values) { bias_b.assign(values.begin(), values.end()); });
  CHECK(bias_b == own);
  CHECK(opt_b.steps() == 1);
  RowMatrix<float> ya(n, d), yb(n, d);
  a.forward(x, ya);
  b.forward(x, yb);
  CHECK(ya == yb);
  // The file names tensors by position: a model with its layers in another order is not this checkpoint.
  const auto file = moe::io::Safetensors::open(path);
  CHECK(file.tensor("layers.2.mlp.router.bias").shape == std::vector<std::int64_t>{8});
  CHECK(file.tensor("layers.0.mlp.bank0.w1").shape == std::vector<std::int64_t>{10, d});
  CHECK(file.tensor("optimizer.layers.1.mlp.router.gate.exp_avg").shape == std::vector<std::int64_t>{4 * d});
  Mixed<float> swapped(dense<float>(d), deepseek<float>(d), mixtral<float>(d));
  moe::optim::AdamW<float> opt_s({});
  CHECK_THROWS_WITH(moe::io::load_checkpoint(swapped, opt_s, path), Contains("layers.1.mlp.router.gate is (4, 8)"));
  std::remove(path.c_str());
}

TEST_CASE("DenseLayer: the bank's output for every token, in place too; backward with dx = dy", "[model][dense]") {
  constexpr Index d = 12, n = 9;
  Dense<double> layer = dense<double>(d);
  layer.init(41);
  moe::test::Rng rng(42);
  const RowMatrix<double> x = moe::test::normal_matrix<double>(rng, n, d);
  RowMatrix<double> y(n, d), expected(n, d);
  moe::Workspace ws, bank_ws;
  const auto r = layer.forward(x, y, ws);
  CHECK(r.n_tokens == n);
  CHECK(r.aux_loss == 0.0);
  bank_ws.reserve(1 << 20);
  moe::Arena arena(bank_ws);
  layer.bank().forward(x, expected, arena);
  CHECK(y == expected);
  RowMatrix<double> inplace = x;
  layer.forward(inplace, inplace, ws);
  CHECK(inplace == expected);

  // dx may be dy; the gradients equal those of a separate dx.
  typename Dense<double>::Context ctx;
  const RowMatrix<double> dy = moe::test::normal_matrix<double>(rng, n, d);
  RowMatrix<double> dx(n, d), g = dy;
  layer.zero_grad();
  layer.forward(x, y, ctx);
  CHECK(ctx.n_tokens() == n);
  layer.backward(dy, dx, ctx);
  const std::vector<double> grads = [&] {
    std::vector<double> all;
    layer.visit_parameters([&](const std::string&, moe::Parameter<double>& p) {
      all.insert(all.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
    });
    return all;
  }();
  layer.zero_grad();
  layer.backward(g, g, ctx);
  CHECK(g == dx);
  std::vector<double> again;
  layer.visit_parameters([&](const std::string&, moe::Parameter<double>& p) {
    again.insert(again.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
  });
  CHECK(again == grads);
}

TEST_CASE("Model and DenseLayer reject bad input with clear errors", "[model][error]") {
  using M = Mixed<float>;
  CHECK_THROWS_WITH(M(dense<float>(6), mixtral<float>(8)),
                    Contains("moe::Model::add: layer 1 has d_model = 8, the model's layers have d_model = 6"));
  M grow(dense<float>(6));
  CHECK_THROWS_WITH(grow.add(deepseek<float>(7)), Contains("layer 1 has d_model = 7"));
  CHECK(grow.n_layers() == 1);
  CHECK_THROWS_WITH(M(std::vector<M::Layer>{}), Contains("needs at least one layer"));

  M empty;
  RowMatrix<float> x = RowMatrix<float>::Ones(3, 6), y(3, 6), dx(3, 6);
  CHECK_THROWS_WITH(empty.forward(x, y), Contains("moe::Model::forward: the model has no layers"));
  CHECK_THROWS_WITH(empty.d_model(), Contains("no layers"));

  M model(dense<float>(6), mixtral<float>(6), deepseek<float>(6));
  model.init(51);
  RowMatrix<float> wrong(3, 5);
  CHECK_THROWS_WITH(model.forward(wrong, wrong),
                    Contains("moe::Model::forward: x is (3, 5) and y (3, 5), expected (n, 6)"));
  RowMatrix<float> short_y(2, 6);
  CHECK_THROWS_WITH(model.forward(x, short_y), Contains("expected (n, 6)"));
  RowMatrix<float> bad = x;
  bad(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(model.forward(bad, y), Contains("moe::DenseLayer::forward: x(1, 2) = nan"));
  CHECK_THROWS_WITH(model.layer<Mixtral<float>>(0), Contains("layer 0 is not of the type asked for"));

  M::Context ctx;
  model.forward(x, y, ctx);
  model.backward(y, dx, ctx);  // gradients now exist
  CHECK(ctx.global_batch(0).counts.empty());  // a dense layer has no balance loss to count for
  CHECK_THROWS_WITH(ctx.global_batch(9), Contains("layer 9 of"));
  ctx.global_batch(1).reset();
  M other(dense<float>(6));
  CHECK_THROWS_WITH(other.backward(y, dx, ctx), Contains("not recorded by a training forward of this model"));
  CHECK_THROWS_WITH(model.backward(wrong, dx, ctx), Contains("expected (3, 6)"));
  // A parameter written after the forward: backward names it and writes no gradient.
  model.zero_grad();
  model.layer<Mixtral<float>>(1).router().visit_parameters(
      [](std::string_view, moe::Parameter<float>& p) { p.data(); });
  CHECK_THROWS_WITH(model.backward(y, dx, ctx), Contains("parameter layers.1.mlp.router.gate was modified"));
  bool any_gradient = false;
  model.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    any_gradient |= moe::detail::eigen(p.grad()).cwiseAbs().maxCoeff() > 0;
  });
  CHECK_FALSE(any_gradient);

  Dense<float> layer = dense<float>(6);
  Dense<float>::Context dctx;
  CHECK_THROWS_WITH(layer.forward(wrong, wrong), Contains("moe::DenseLayer::forward: x is (3, 5) but d_model = 6"));
  CHECK_THROWS_WITH(layer.backward(y, dx, dctx), Contains("not recorded by a training forward of this layer"));
}
