// Sizes whose products overflow (issue 12, bug 3): every constructor that sizes storage from user fields, and
// the workspace of n_tokens, checks its products against PTRDIFF_MAX bytes and throws moe::Error naming the
// fields. Before, such shapes constructed (an overflowed product sizing an empty buffer: undefined behaviour,
// then out-of-bounds access) or threw std::length_error / std::bad_alloc. No test here allocates more than a
// few kilobytes: every shape is rejected before its first buffer.

#include <cstddef>
#include <limits>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/experts/gru.hpp>
#include <moe/experts/lora.hpp>
#include <moe/experts/zero_computation.hpp>
#include <moe/moe_layer.hpp>
#include <moe/parameter.hpp>
#include <moe/routers/dense_to_sparse.hpp>
#include <moe/routers/expert_choice.hpp>
#include <moe/routers/gating_residual.hpp>
#include <moe/routers/null_experts.hpp>
#include <moe/routers/top_k_router.hpp>
#include <moe/routers/top_k_softmax.hpp>
#include <moe/workspace.hpp>

using Catch::Matchers::Contains;
using moe::Index;

namespace {

constexpr Index k_2_20 = Index{1} << 20;
constexpr Index k_2_44 = Index{1} << 44;

// The probe of the issue: d_model * d_ff = 2^64 elements.
constexpr moe::MoEConfig k_probe{.d_model = k_2_20, .d_ff = k_2_44, .n_experts = 1, .top_k = 1};
// A router gate of 2^30 * 2^40 = 2^70 elements.
constexpr moe::MoEConfig k_wide_gate{.d_model = Index{1} << 40, .d_ff = 1, .n_experts = Index{1} << 30, .top_k = 1};

// The least a router needs to build GatingResidual's map: n_experts() of 2^32, so the map holds 2^64 elements.
// A TopKRouter that reports 2^32 experts: what GatingResidual sizes its (n_experts, n_experts) map from.
struct HugeRouter : moe::routers::TopKRouter<float> {
  HugeRouter() : moe::routers::TopKRouter<float>({.d_model = 2, .d_ff = 1, .n_experts = 2, .top_k = 1}) {}
  Index n_experts() const { return Index{1} << 32; }
};

}  // namespace

TEST_CASE("An FFN bank (and a layer) whose n_experts * d_ff * d_model overflows throws moe::Error", "[bad_input]") {
  using Layer = moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::SwiGLU<float>>;
  REQUIRE_THROWS_AS(Layer(k_probe), moe::Error);
  REQUIRE_THROWS_WITH(Layer(k_probe), Contains("moe::experts::FFN") && Contains("n_experts * d_ff * d_model") &&
                                          Contains("1 * 17592186044416 * 1048576"));
  REQUIRE_THROWS_WITH(moe::experts::SwiGLU<double>(k_probe), Contains("n_experts * d_ff * d_model"));
  // The weights fit (2^58 floats), the panels padded to whole panels do not (2^58 experts, >= 8 columns each).
  const moe::MoEConfig many{.d_model = 1, .d_ff = 1, .n_experts = Index{1} << 58, .top_k = 1};
  REQUIRE_THROWS_WITH(moe::experts::SwiGLU<float>(many), Contains("moe::experts::FFN") && Contains("panels"));
}

TEST_CASE("Routers whose gate n_experts * d_model overflows throw moe::Error naming the product", "[bad_input]") {
  // (Catch2 v2 matchers hold their parts by reference: each is built inside its assertion.)
  const char* product = "n_experts * d_model = 1073741824 * 1099511627776";
  REQUIRE_THROWS_WITH(moe::routers::TopKRouter<float>(k_wide_gate),
                      Contains("moe::routers::TopKRouter") && Contains(product));
  REQUIRE_THROWS_WITH(moe::routers::DenseToSparseGate<float>(k_wide_gate),
                      Contains("moe::routers::DenseToSparseGate") && Contains(product));
  REQUIRE_THROWS_WITH(moe::routers::ExpertChoiceRouter<float>(k_wide_gate),
                      Contains("moe::routers::ExpertChoiceRouter") && Contains(product));
  // n + m rows, each of d_model = 4: (2^59 + 4) * 4 elements.
  REQUIRE_THROWS_WITH(moe::routers::NullExpertRouter<float>({.d_model = 4, .d_ff = 1, .n_experts = 4, .top_k = 2},
                                                            {.n_null_experts = Index{1} << 59}),
                      Contains("moe::routers::NullExpertRouter") &&
                          Contains("(n_experts + options.n_null_experts) * d_model"));
  // n + m itself overflows.
  REQUIRE_THROWS_WITH(moe::routers::NullExpertRouter<float>({.d_model = 4, .d_ff = 1, .n_experts = 4, .top_k = 2},
                                                            {.n_null_experts = std::numeric_limits<Index>::max() - 1}),
                      Contains("n_experts + options.n_null_experts"));
  REQUIRE_THROWS_WITH(moe::routers::GatingResidual<HugeRouter>(HugeRouter{}),
                      Contains("moe::routers::GatingResidual") && Contains("n_experts * n_experts"));
}

TEST_CASE("LoRA, GRU and constant-expert banks check the products that size their weights", "[bad_input]") {
  const moe::MoEConfig small{.d_model = 8, .d_ff = 8, .n_experts = Index{1} << 40, .top_k = 1};
  REQUIRE_THROWS_WITH(moe::experts::LoRASwiGLU<float>(small, {.rank = Index{1} << 30}),
                      Contains("moe::experts::LoRA") && Contains("n_experts * opts.rank * max(d_model, d_ff)"));
  REQUIRE_THROWS_WITH(moe::experts::LoRASwiGLU<float>(k_probe, {.rank = 1}),
                      Contains("moe::experts::LoRA") && Contains("d_ff * d_model"));
  REQUIRE_THROWS_WITH(moe::experts::GRU<float>({.d_model = Index{1} << 31, .d_ff = 1, .n_experts = 1024, .top_k = 1}),
                      Contains("moe::experts::GRU") && Contains("n_experts * 3 * d_model * d_model"));
  REQUIRE_THROWS_WITH(moe::experts::ConstantExperts<float>(Index{1} << 61, 4),
                      Contains("moe::experts::ConstantExperts") && Contains("2 * n_experts * d_model"));
  REQUIRE_THROWS_WITH(moe::Parameter<float>(k_2_44, k_2_44), Contains("moe::Parameter") && Contains("rows * cols"));
}

TEST_CASE("The workspace of n_tokens is checked: huge or negative n_tokens throw moe::Error", "[bad_input]") {
  moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::SwiGLU<float>> layer(
      moe::MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 4, .top_k = 2});
  for (const Index n : {Index{1} << 62, std::numeric_limits<Index>::max(), Index{1} << 56}) {
    INFO("n_tokens = " << n);
    REQUIRE_THROWS_AS(layer.workspace_bytes(n), moe::Error);
    REQUIRE_THROWS_WITH(layer.workspace_bytes(n), Contains("moe::MoELayer") && Contains("n_tokens"));
  }
  REQUIRE_THROWS_WITH(layer.workspace_bytes(-1), Contains("n_tokens = -1"));
  // Large but representable: linear in n_tokens, no throw.
  const std::size_t one = layer.workspace_bytes(1), many = layer.workspace_bytes(Index{1} << 30);
  REQUIRE(many >= (std::size_t{1} << 30) * 8 * sizeof(float));
  REQUIRE(many <= 2 * (std::size_t{1} << 30) * one);

  moe::Arena measure;
  REQUIRE_THROWS_WITH(measure.take<float>(-1), Contains("moe::Arena::take"));
  const Index too_many = std::numeric_limits<Index>::max() / Index{sizeof(float)} + 1;  // beyond PTRDIFF_MAX bytes
  REQUIRE_THROWS_WITH(measure.take<float>(too_many), Contains("moe::Arena::take"));
  REQUIRE(measure.take<float>(4) == nullptr);
}
