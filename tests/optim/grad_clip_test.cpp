// optim/grad_clip.hpp: the global-norm rule of torch.nn.utils.clip_grad_norm_.

#include <cmath>
#include <limits>

#include <catch2/catch.hpp>
#include <moe/optim/grad_clip.hpp>

#include "optim/one_parameter.hpp"

namespace {
struct TwoParameters {
  moe::Parameter<double> a{1, 2}, b{2, 1};
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string("a"), a);
    f(std::string("b"), b);
  }
};
}  // namespace

TEST_CASE("clip_grad_norm scales all gradients together, only when above the bound", "[optim]") {
  TwoParameters m;
  m.a.grad()(0, 0) = 3, m.a.grad()(0, 1) = 0, m.b.grad()(0, 0) = 0, m.b.grad()(1, 0) = 4;  // norm 5
  REQUIRE(moe::optim::clip_grad_norm(m, 10.0) == Approx(5.0));
  REQUIRE(m.a.grad()(0, 0) == 3.0);  // below the bound: untouched
  REQUIRE(moe::optim::clip_grad_norm(m, 1.0) == Approx(5.0));
  CHECK(m.a.grad()(0, 0) == Approx(3.0 / (5.0 + 1e-6)));
  CHECK(m.b.grad()(1, 0) == Approx(4.0 / (5.0 + 1e-6)));
  CHECK(std::hypot(m.a.grad()(0, 0), m.b.grad()(1, 0)) == Approx(1.0).epsilon(1e-6));
}

TEST_CASE("clip_grad_norm returns a non-finite norm without scaling", "[optim]") {
  moe::test::OneParameter m(1.0, std::numeric_limits<double>::infinity());
  REQUIRE(std::isinf(moe::optim::clip_grad_norm(m, 1.0)));
  REQUIRE(std::isinf(m.p.grad()(0, 0)));
  REQUIRE_THROWS_AS(moe::optim::clip_grad_norm(m, 0.0), moe::Error);
}
