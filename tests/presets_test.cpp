// presets.hpp: the aliases compose what their names promise.

#include <type_traits>

#include <catch2/catch.hpp>
#include <moe/presets.hpp>

TEST_CASE("MixtralMoE is a top-k softmax router over SwiGLU experts in float", "[presets]") {
  STATIC_REQUIRE(std::is_same_v<moe::MixtralMoE::Scalar, float>);
  STATIC_REQUIRE(std::is_same_v<moe::MixtralMoE::RouterType, moe::routers::TopKSoftmax<float>>);
  STATIC_REQUIRE(std::is_same_v<moe::MixtralMoEType<double>::Scalar, double>);
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 8, .d_ff = 16, .n_experts = 8, .top_k = 2});
  REQUIRE(layer.router().renormalize());
  REQUIRE(layer.top_k() == 2);
  using Bank = std::remove_cvref_t<decltype(layer.bank<0>())>;
  STATIC_REQUIRE(Bank::gated);
  STATIC_REQUIRE(std::is_same_v<Bank::Activation, moe::kernels::SiLU>);
}
