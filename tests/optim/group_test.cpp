// optim/group.hpp: a ParameterGroup visits exactly the model's parameters under its prefix, in order and with
// the model's names, and an optimizer stepping the group leaves every other parameter bit for bit.

#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

TEST_CASE("ParameterGroup visits the prefixed parameters only, and a step through it touches nothing else", "[optim]") {
  const moe::MoEConfig cfg{.d_model = 8, .d_ff = 12, .n_experts = 3, .top_k = 2};
  moe::MixtralMoE layer(cfg);
  layer.init(1);
  std::vector<std::string> all, router, bank;
  layer.visit_parameters([&](const std::string& name, auto&) { all.push_back(name); });
  moe::optim::ParameterGroup router_group(layer, "router.");
  moe::optim::ParameterGroup bank_group(layer, "bank0.");
  router_group.visit_parameters([&](const std::string& name, auto&) { router.push_back(name); });
  bank_group.visit_parameters([&](const std::string& name, auto&) { bank.push_back(name); });
  CHECK(router == std::vector<std::string>{"router.gate"});
  CHECK(bank == std::vector<std::string>{"bank0.w1", "bank0.w3", "bank0.w2"});
  CHECK(all.size() == router.size() + bank.size());

  // Gradients everywhere, then one SGD step through the bank group: the router's gate keeps its bits.
  layer.visit_parameters([&](const std::string&, auto& p) { moe::detail::eigen(p.grad()).setConstant(1.0f); });
  const moe::RowMatrix<float> gate = moe::detail::eigen(std::as_const(layer).router().gate());
  const moe::RowMatrix<float> w1 = moe::detail::eigen(std::as_const(layer).bank<0>().w1(0));
  moe::optim::SGD<float> sgd({.lr = 0.5});
  sgd.step(bank_group);
  CHECK(moe::detail::eigen(std::as_const(layer).router().gate()) == gate);
  CHECK(moe::detail::eigen(std::as_const(layer).bank<0>().w1(0)) != w1);
}
