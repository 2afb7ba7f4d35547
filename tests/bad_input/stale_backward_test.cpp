// A stale backward: weights written between the training forward and backward (a user write through a
// non-const accessor, an optimizer step) would give the gradients of neither model. backward throws
// moe::Error naming the parameter, before writing dx or any gradient.

#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using Catch::Matchers::Contains;
using moe::Index;
using moe::RowMatrix;
namespace experts = moe::experts;
namespace routers = moe::routers;

namespace {

using GatedShared = experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>;
using Layer = moe::MoELayer<routers::TopKSoftmax<float>, experts::SwiGLU<float>, GatedShared>;

Layer make_layer(std::uint64_t seed) {
  const moe::MoEConfig cfg{.d_model = 8, .d_ff = 6, .n_experts = 4, .top_k = 2};
  Layer layer{routers::TopKSoftmax<float>(cfg), experts::SwiGLU<float>(cfg),
              GatedShared({.d_model = 8, .d_ff = 5, .n_experts = 1, .top_k = 1})};
  layer.init(seed);
  return layer;
}

// Every gradient set to a canary, so a throwing backward can be seen not to have written any.
constexpr float k_canary = 0.25f;

template <class Model>
void fill_gradients(Model& model) {
  model.visit_parameters([](const std::string&, moe::Parameter<float>& p) {
    const auto g = p.grad();
    std::fill_n(g.data(), g.rows() * g.cols(), k_canary);
  });
}

template <class Model>
bool gradients_untouched(Model& model) {
  bool all = true;
  model.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    const auto g = p.grad();
    for (Index i = 0; i < g.rows() * g.cols(); ++i) all = all && g.data()[i] == k_canary;
  });
  return all;
}

// Adds `delta` to the first element of the parameter named `name`, through the visitor's Parameter&.
template <class Model>
void nudge(Model& model, const std::string& name, float delta) {
  bool found = false;
  model.visit_parameters([&](const std::string& n, moe::Parameter<float>& p) {
    if (n != name) return;
    p.data()[0] += delta;
    found = true;
  });
  REQUIRE(found);
}

}  // namespace

TEST_CASE("MoELayer::backward after a weight write throws moe::Error naming the parameter", "[bad_input][stale]") {
  Layer layer = make_layer(2);
  moe::test::Rng rng(3);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 11, 8);
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, 11, 8);
  RowMatrix<float> y(11, 8);
  moe::TrainingContext<float> ctx;
  const float dx_canary = -777.0f;
  RowMatrix<float> dx = RowMatrix<float>::Constant(11, 8, dx_canary);

  SECTION("no write: no throw, and a repeated backward on the same context is allowed") {
    layer.forward(x, y, ctx);
    layer.zero_grad();
    REQUIRE_NOTHROW(layer.backward(dy, dx, ctx));
    REQUIRE_NOTHROW(layer.backward(dy, dx, ctx));
    // Reading weights through const accessors is not a write.
    const Layer& read_only = layer;
    REQUIRE(read_only.bank<0>().w1(0)(0, 0) != 0.0f);
    REQUIRE_NOTHROW(layer.backward(dy, dx, ctx));
  }
  SECTION("saving a checkpoint reads the weights: backward still runs; loading one writes them") {
    const std::string path =
        (std::filesystem::temp_directory_path() / "moe_bad_input_stale_backward_test.ckpt").string();
    layer.forward(x, y, ctx);
    moe::io::save_checkpoint(layer, path);
    REQUIRE_NOTHROW(layer.backward(dy, dx, ctx));
    fill_gradients(layer);
    moe::io::load_checkpoint(layer, path);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("router.gate"));
    CHECK(gradients_untouched(layer));
    std::filesystem::remove(path);
  }
  SECTION("a routed expert's weight through the bank's non-const accessor") {
    layer.forward(x, y, ctx);
    fill_gradients(layer);
    layer.bank<0>().w1(1)(0, 0) += 0.5f;
    REQUIRE_THROWS_AS(layer.backward(dy, dx, ctx), moe::Error);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("bank0.w1") && Contains("modified after the training forward"));
    CHECK((dx.array() == dx_canary).all());
    CHECK(gradients_untouched(layer));
    // A new training forward records the new weights: backward runs again.
    layer.forward(x, y, ctx);
    REQUIRE_NOTHROW(layer.backward(dy, dx, ctx));
    CHECK((dx.array() != dx_canary).any());
  }
  SECTION("the router's gate and the shared bank's gate") {
    layer.forward(x, y, ctx);
    fill_gradients(layer);
    layer.router().gate()(0, 0) -= 0.5f;
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("router.gate"));
    layer.forward(x, y, ctx);
    nudge(layer, "bank1.shared_gate", 0.5f);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("bank1.shared_gate"));
    // A write that restores the old value still counts: the check is on version(), not on the values.
    layer.forward(x, y, ctx);
    nudge(layer, "bank1.w2", 0.0f);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx), Contains("bank1.w2"));
    CHECK((dx.array() == dx_canary).all());
    CHECK(gradients_untouched(layer));
  }
  SECTION("an optimizer step between forward and backward") {
    layer.forward(x, y, ctx);
    layer.zero_grad();
    layer.backward(dy, dx, ctx);
    layer.forward(x, y, ctx);
    moe::optim::AdamW<float> adam({.lr = 1e-3});
    adam.step(layer);
    fill_gradients(layer);
    dx.setConstant(dx_canary);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx, ctx),
                        Contains("router.gate") && Contains("modified after the training forward"));
    CHECK((dx.array() == dx_canary).all());
    CHECK(gradients_untouched(layer));

    layer.forward(x, y, ctx);
    moe::optim::SGD<float> sgd({.lr = 1e-3});
    sgd.step(layer);
    REQUIRE_THROWS_AS(layer.backward(dy, dx, ctx), moe::Error);
    CHECK(gradients_untouched(layer));
  }
}

TEST_CASE("Stack::backward after a weight write throws before any layer writes a gradient", "[bad_input][stale]") {
  std::vector<Layer> layers;
  layers.push_back(make_layer(1));
  layers.push_back(make_layer(2));
  moe::Stack<Layer> stack(std::move(layers));
  stack.init(4);
  moe::test::Rng rng(5);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 9, 8);
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, 9, 8);
  RowMatrix<float> y(9, 8);
  const float dx_canary = -777.0f;
  RowMatrix<float> dx = RowMatrix<float>::Constant(9, 8, dx_canary);
  moe::StackContext<float> ctx;

  stack.forward(x, y, ctx);
  fill_gradients(stack);
  // Layer 0 is the last one backward reaches: layer 1 must not have written its gradients before the throw.
  stack.layer(0).bank<0>().w2(0)(1, 1) += 0.5f;
  REQUIRE_THROWS_AS(stack.backward(dy, dx, ctx), moe::Error);
  REQUIRE_THROWS_WITH(stack.backward(dy, dx, ctx), Contains("layer0.bank0.w2") && Contains("modified after the training forward"));
  CHECK((dx.array() == dx_canary).all());
  CHECK(gradients_untouched(stack));

  stack.forward(x, y, ctx);
  moe::optim::SGD<float> sgd({.lr = 1e-3});
  sgd.step(stack);
  REQUIRE_THROWS_WITH(stack.backward(dy, dx, ctx), Contains("layer0.router.gate"));
  CHECK(gradients_untouched(stack));

  stack.forward(x, y, ctx);
  REQUIRE_NOTHROW(stack.backward(dy, dx, ctx));
  CHECK(!gradients_untouched(stack));
}
