// optim/sgd.hpp: PyTorch's SGD update, computed by hand.

#include <catch2/catch.hpp>
#include <moe/optim/sgd.hpp>

#include "optim/one_parameter.hpp"

using Catch::Matchers::Contains;

TEST_CASE("SGD with momentum follows torch.optim.SGD step by step", "[optim]") {
  moe::test::OneParameter model(1.0, 0.5);
  moe::optim::SGD<double> sgd({.lr = 0.1, .momentum = 0.9});
  sgd.step(model);
  CHECK(model.value() == Approx(0.95).epsilon(1e-15));  // b = g = 0.5
  sgd.step(model);
  CHECK(model.value() == Approx(0.855).epsilon(1e-15));  // b = 0.9 * 0.5 + 0.5
}

TEST_CASE("SGD: Nesterov momentum, weight decay and plain steps", "[optim]") {
  moe::test::OneParameter a(1.0, 0.5), b(2.0, 0.5), c(1.0, 0.5);
  moe::optim::SGD<double>({.lr = 0.1, .momentum = 0.9, .nesterov = true}).step(a);
  CHECK(a.value() == Approx(1.0 - 0.1 * (0.5 + 0.9 * 0.5)).epsilon(1e-15));
  moe::optim::SGD<double>({.lr = 0.1, .weight_decay = 0.25}).step(b);
  CHECK(b.value() == Approx(2.0 - 0.1 * (0.5 + 0.25 * 2.0)).epsilon(1e-15));
  moe::optim::SGD<double> plain({.lr = 0.5});
  plain.step(c);
  plain.step(c);
  CHECK(c.value() == Approx(0.5).epsilon(1e-15));
}

TEST_CASE("SGDConfig is validated", "[optim][error]") {
  REQUIRE_THROWS_WITH(moe::optim::SGD<float>({.lr = 0}), Contains("lr = 0"));
  REQUIRE_THROWS_WITH(moe::optim::SGD<float>({.lr = 0.1, .momentum = 1}), Contains("momentum = 1"));
  REQUIRE_THROWS_WITH(moe::optim::SGD<float>({.lr = 0.1, .nesterov = true}), Contains("nesterov needs momentum"));
}

namespace {
struct Wider {  // a parameter named like OneParameter's, with another size
  moe::Parameter<double> p{1, 3};
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string("p"), p);
  }
};
}  // namespace

TEST_CASE("An optimizer refuses a parameter whose size changed under the same name", "[optim][error]") {
  moe::test::OneParameter small(1.0, 0.5);
  Wider wide;
  moe::optim::SGD<double> sgd({.lr = 0.1, .momentum = 0.5});
  sgd.step(small);
  REQUIRE_THROWS_WITH(sgd.step(wide), Contains("parameter p changed size"));
}
