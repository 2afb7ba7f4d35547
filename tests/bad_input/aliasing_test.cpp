// backward(dy, dx) with dx and dy the same matrix, as documented: the input gradient and every parameter
// gradient must be bitwise those of separate matrices. A layer with always-on (shared) banks once wrote dx
// before the shared banks read dy.

#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;
namespace experts = moe::experts;
namespace routers = moe::routers;

namespace {

// Routed SwiGLU experts, then two always-on banks: a sigmoid-gated one (Qwen2-MoE) and a plain one
// (DeepSeekMoE), so the shared outputs are summed as well as read.
using GatedShared = experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>;
using PlainShared = experts::Shared<experts::SwiGLU<float>>;
using Layer = moe::MoELayer<routers::TopKSoftmax<float>, experts::SwiGLU<float>, GatedShared, PlainShared>;

Layer make_layer(std::uint64_t seed) {
  const moe::MoEConfig cfg{.d_model = 12, .d_ff = 10, .n_experts = 4, .top_k = 2};
  Layer layer{routers::TopKSoftmax<float>(cfg), experts::SwiGLU<float>(cfg),
              GatedShared({.d_model = 12, .d_ff = 8, .n_experts = 1, .top_k = 1}),
              PlainShared({.d_model = 12, .d_ff = 6, .n_experts = 2, .top_k = 1})};
  layer.init(seed);
  return layer;
}

template <class Model>
std::vector<std::vector<float>> gradients(Model& model) {
  std::vector<std::vector<float>> all;
  model.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    const auto g = p.grad();
    all.emplace_back(g.data(), g.data() + g.rows() * g.cols());
  });
  return all;
}

// Largest |a - b| over every gradient element, for the failure message.
float max_difference(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  float m = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t j = 0; j < a[i].size(); ++j) m = std::max(m, std::abs(a[i][j] - b[i][j]));
  return m;
}

// Backward into a separate dx, then in place (dx is dy) after the same forward: dx and every parameter
// gradient must agree bitwise. Context is the model's training context type.
template <class Context, class Model>
void check_in_place_backward(Model& model, Index n_tokens, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  const Index d = model.d_model();
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, d);
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, n_tokens, d);
  RowMatrix<float> y(n_tokens, d);
  Context ctx;

  model.forward(x, y, ctx);
  model.zero_grad();
  RowMatrix<float> dx(n_tokens, d);
  model.backward(dy, dx, ctx);
  const auto separate = gradients(model);

  model.forward(x, y, ctx);
  model.zero_grad();
  RowMatrix<float> in_place = dy;
  model.backward(in_place, in_place, ctx);  // dx is dy
  const auto aliased = gradients(model);

  REQUIRE(dx.norm() > 0);
  INFO("max |dx difference| = " << (in_place - dx).cwiseAbs().maxCoeff()
                                << ", max |parameter gradient difference| = " << max_difference(aliased, separate));
  const bool same_dx = in_place == dx, same_gradients = aliased == separate;
  CHECK(same_dx);
  CHECK(same_gradients);
}

}  // namespace

TEST_CASE("MoELayer::backward with dx == dy and shared banks gives the gradients of separate matrices",
          "[bad_input][aliasing]") {
  Layer layer = make_layer(3);
  check_in_place_backward<moe::TrainingContext<float>>(layer, 21, 8);
}

TEST_CASE("Stack::backward with dx == dy and shared banks gives the gradients of separate matrices",
          "[bad_input][aliasing]") {
  std::vector<Layer> layers;
  layers.push_back(make_layer(1));
  layers.push_back(make_layer(2));
  moe::Stack<Layer> stack(std::move(layers));
  stack.init(5);
  check_in_place_backward<moe::StackContext<float>>(stack, 13, 9);
}
