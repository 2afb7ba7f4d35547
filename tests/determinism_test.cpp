// RELIABILITY.md D1: 100 identical calls of forward and backward on random non-integer floats are bitwise
// equal (memcmp): the output, the routing (ids, weights, tokens per expert), the aux loss, the input
// gradient and every parameter gradient, for several kinds of layer. One TrainingContext serves every call,
// so state a call leaves behind (workspaces, records, lazily packed panels) would show in the next one.

#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using moe::Index;
using moe::MoEConfig;
using moe::RowMatrix;

namespace {

// Everything one forward + backward produced.
struct Snapshot {
  std::vector<float> y, weights, dx, grads;
  std::vector<Index> ids, tokens_per_expert;
  double aux = 0;
};

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0);
}

bool same_bytes(const Snapshot& a, const Snapshot& b) {
  return same_bytes(a.y, b.y) && same_bytes(a.weights, b.weights) && same_bytes(a.dx, b.dx) &&
         same_bytes(a.grads, b.grads) && same_bytes(a.ids, b.ids) && same_bytes(a.tokens_per_expert, b.tokens_per_expert) &&
         std::memcmp(&a.aux, &b.aux, sizeof(double)) == 0;
}

template <class Layer>
Snapshot step(Layer& layer, const RowMatrix<float>& x, const RowMatrix<float>& dy, moe::TrainingContext<float>& ctx,
              std::span<const Index> starts) {
  Snapshot s;
  RowMatrix<float> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  layer.zero_grad();
  const auto res = layer.forward(x, y, ctx, starts);
  s.ids.assign(res.expert_ids.begin(), res.expert_ids.end());
  s.weights.assign(res.expert_weights.begin(), res.expert_weights.end());
  s.tokens_per_expert.assign(res.tokens_per_expert.begin(), res.tokens_per_expert.end());
  s.aux = res.aux_loss;
  layer.backward(dy, dx, ctx);
  s.y.assign(y.data(), y.data() + y.size());
  s.dx.assign(dx.data(), dx.data() + dx.size());
  layer.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    s.grads.insert(s.grads.end(), p.grad().data(), p.grad().data() + p.rows() * p.cols());
  });
  return s;
}

// Fraction of exact zeros in v.
double zero_fraction(const std::vector<float>& v) {
  Index zeros = 0;
  for (const float f : v) zeros += f == 0.0f ? 1 : 0;
  return v.empty() ? 1.0 : static_cast<double>(zeros) / static_cast<double>(v.size());
}

template <class Layer>
void check_repeats(const char* name, Layer& layer, Index n_tokens, std::span<const Index> starts = {}) {
  INFO(name);
  moe::test::Rng rng(71);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, layer.d_model());
  const RowMatrix<float> dy = moe::test::normal_matrix<float>(rng, n_tokens, layer.d_model());
  moe::TrainingContext<float> ctx;
  const Snapshot first = step(layer, x, dy, ctx, starts);

  // Not vacuous (RELIABILITY H4): most experts get tokens; outputs and gradients are mostly non-zero.
  Index used = 0;
  for (const Index n : first.tokens_per_expert) used += n > 0 ? 1 : 0;
  CHECK(2 * used >= static_cast<Index>(first.tokens_per_expert.size()));
  CHECK(zero_fraction(first.y) < 0.3);
  CHECK(zero_fraction(first.dx) < 0.3);
  CHECK(zero_fraction(first.grads) < 0.3);

  Index mismatches = 0;
  for (int call = 1; call < 100; ++call) {
    if (!same_bytes(first, step(layer, x, dy, ctx, starts)) && mismatches++ == 0)
      UNSCOPED_INFO("first difference at call " << call);
  }
  CHECK(mismatches == 0);
}

const MoEConfig k_cfg{.d_model = 32, .d_ff = 80, .n_experts = 8, .top_k = 2};

}  // namespace

TEST_CASE("D1: 100 forward + backward calls of a Mixtral layer are bitwise identical", "[layer][determinism]") {
  moe::MixtralMoE layer(k_cfg);
  layer.init(3);
  check_repeats("Mixtral", layer, 97);
}

TEST_CASE("D1: capacity limit with dropped slots and a gated shared expert, bitwise on repeat", "[layer][determinism]") {
  using Capped = moe::routers::CapacityLimited<moe::routers::TopKSoftmax<float>>;
  using SharedBank = moe::experts::Shared<moe::experts::SwiGLU<float>, moe::experts::SigmoidSharedGate>;
  moe::MoELayer<Capped, moe::experts::SwiGLU<float>, SharedBank> layer(
      Capped(moe::routers::TopKSoftmax<float>(k_cfg), {.capacity_factor = 1.0}), moe::experts::SwiGLU<float>(k_cfg),
      SharedBank({.d_model = 32, .d_ff = 48, .n_experts = 1, .top_k = 1}));
  layer.init(4);
  check_repeats("capacity + shared", layer, 97);
}

TEST_CASE("D1: jitter and Gumbel noise with balance losses over LoRA experts, bitwise on repeat", "[layer][determinism]") {
  using Router = moe::routers::WithLosses<moe::routers::TopKRouter<float>, moe::losses::SwitchLoss, moe::losses::ZLoss>;
  moe::MoELayer<Router, moe::experts::LoRASwiGLU<float>> layer(
      Router(moe::routers::TopKRouter<float>(k_cfg, {.jitter = 0.05, .gumbel_noise = true, .seed = 8}),
             moe::losses::SwitchLoss{}, moe::losses::ZLoss{}),
      moe::experts::LoRASwiGLU<float>(k_cfg, {.rank = 4, .b_init = moe::experts::Normal{.std = 0.1}}));
  layer.init(5);
  layer.router().inner().set_training(true);
  layer.router().inner().set_step(12);
  check_repeats("noisy router with losses, LoRA", layer, 97);
}

TEST_CASE("D1: GRU experts carrying state along sequences, bitwise on repeat", "[layer][determinism]") {
  const MoEConfig cfg{.d_model = 24, .d_ff = 1, .n_experts = 4, .top_k = 2};
  moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::GRU<float>> layer{moe::routers::TopKSoftmax<float>(cfg),
                                                                               moe::experts::GRU<float>(cfg)};
  layer.init(6);
  const std::vector<Index> starts = {0, 20, 21, 50, 80};
  check_repeats("GRU with sequences", layer, 97, starts);
}

TEST_CASE("D1: MoE++ with constant, copy and zero experts, bitwise on repeat", "[layer][determinism]") {
  moe::MoEPlusPlus layer(
      moe::routers::TopKSoftmax<float>({.d_model = 32, .d_ff = 64, .n_experts = 8, .top_k = 2}, {.renormalize = false}),
      moe::experts::SwiGLU<float>({.d_model = 32, .d_ff = 64, .n_experts = 5}),
      moe::experts::ConstantExperts<float>(1, 32), moe::experts::CopyExperts<float>(1, 32),
      moe::experts::ZeroExperts<float>(1, 32));
  layer.init(7);
  check_repeats("MoE++", layer, 97);
}
