#pragma once
// A model with one scalar parameter and a fixed gradient, for checking optimizer arithmetic by hand.

#include <string>

#include <moe/parameter.hpp>

namespace moe::test {

struct OneParameter {
  moe::Parameter<double> p{1, 1};
  OneParameter(double value, double grad) {
    p.data()[0] = value;
    p.grad()(0, 0) = grad;
  }
  double value() const { return p.data()[0]; }
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string("p"), p);
  }
};

}  // namespace moe::test
