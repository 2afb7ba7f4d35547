#pragma once
// RELIABILITY.md G4: an f32 model's backward against the same model in double, on the same weights and inputs.

#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/config.hpp>
#include <moe/parameter.hpp>

#include "nmse.hpp"

namespace moe::test {

/// Copies every parameter of `from` into `to` (the same model in another scalar: same visit order and shapes).
template <class From, class To>
void copy_parameters(From& from, To& to) {
  using S = typename From::Scalar;
  std::vector<const Parameter<S>*> source;
  from.visit_parameters([&](const std::string&, Parameter<S>& p) { source.push_back(&p); });
  std::size_t i = 0;
  to.visit_parameters([&](const std::string& name, auto& p) {
    INFO(name);
    REQUIRE(i < source.size());
    const auto* src = source[i++];
    REQUIRE((src->rows() == p.rows() && src->cols() == p.cols()));
    for (Index j = 0; j < p.rows() * p.cols(); ++j) p.data()[j] = static_cast<typename To::Scalar>(src->data()[j]);
  });
}

/// Training forward and backward of `lf` (f32) and `ld` (double) on x and dy, after copying lf's weights into
/// ld (exactly): dx and every parameter gradient of lf within NMSE `bound` of ld's.
template <class ModelF, class ModelD>
void check_backward_against_double(ModelF& lf, ModelD& ld, const RowMatrix<float>& x, const RowMatrix<float>& dy,
                                   double bound) {
  copy_parameters(lf, ld);
  const Index n = x.rows(), d = x.cols();
  RowMatrix<float> yf(n, d), dxf(n, d);
  RowMatrix<double> yd(n, d), dxd(n, d);
  moe::TrainingContext<float> cf;
  moe::TrainingContext<double> cd;
  lf.forward(x, yf, cf);
  ld.forward(RowMatrix<double>(x.cast<double>()), yd, cd);
  lf.zero_grad();
  ld.zero_grad();
  lf.backward(dy, dxf, cf);
  ld.backward(RowMatrix<double>(dy.cast<double>()), dxd, cd);
  REQUIRE(dxd.norm() > 0);
  CHECK(nmse(dxd.data(), dxf.data(), static_cast<std::size_t>(dxd.size())) <= bound);
  std::vector<std::vector<double>> gd;
  ld.visit_parameters([&](const std::string&, Parameter<double>& p) {
    gd.emplace_back(p.grad().data(), p.grad().data() + p.rows() * p.cols());
  });
  std::size_t i = 0;
  lf.visit_parameters([&](const std::string& name, Parameter<float>& p) {
    INFO(name);
    CHECK(nmse(gd[i].data(), p.grad().data(), gd[i].size()) <= bound);
    ++i;
  });
}

}  // namespace moe::test
