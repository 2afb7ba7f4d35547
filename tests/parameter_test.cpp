// Parameter<T> (include/moe/parameter.hpp).

#include <cmath>

#include <catch2/catch.hpp>
#include <moe/parameter.hpp>

TEST_CASE("Parameter allocates its gradient on first use and zeroes it on request", "[parameter]") {
  moe::Parameter<float> p(3, 4);
  REQUIRE(p.rows() == 3);
  REQUIRE(p.cols() == 4);
  REQUIRE_FALSE(p.has_grad());
  p.zero_grad();  // nothing to zero yet: stays unallocated
  REQUIRE_FALSE(p.has_grad());
  auto g = p.grad();
  REQUIRE(p.has_grad());
  REQUIRE(g.rows() == 3);
  for (moe::Index i = 0; i < 12; ++i) REQUIRE(g.data()[i] == 0.0f);
  g(1, 2) = 5.0f;
  REQUIRE(p.grad()(1, 2) == 5.0f);  // same buffer, not reallocated
  p.zero_grad();
  REQUIRE(p.grad()(1, 2) == 0.0f);
  REQUIRE(reinterpret_cast<std::uintptr_t>(p.data()) % 64 == 0);
}

TEST_CASE("Parameter::init_uniform draws from the nn.Linear range, reproducibly", "[parameter]") {
  moe::Parameter<double> a(20, 25), b(20, 25);
  moe::Rng r1(7), r2(7);
  a.init_uniform(r1, 25);
  b.init_uniform(r2, 25);
  double lo = 1, hi = -1;
  for (moe::Index i = 0; i < 500; ++i) {
    REQUIRE(a.data()[i] == b.data()[i]);
    lo = std::min(lo, a.data()[i]);
    hi = std::max(hi, a.data()[i]);
  }
  REQUIRE(lo >= -0.2);
  REQUIRE(hi <= 0.2);
  REQUIRE(hi - lo > 0.3);  // spread over the range, not a constant
}
