// experts/zero_computation.hpp: zero, copy and constant experts on their own and in a heterogeneous
// MoE++ layer (FFN + constant + copy + zero), forward against naive double formulas and backward against
// finite differences.

#include <bit>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/zero_computation.hpp>
#include <moe/moe.hpp>
#include <moe/reference/naive_moe.hpp>

#include "support/gradcheck.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;
using Catch::Matchers::Contains;

namespace {

template <class T>
using MoEPP = moe::MoELayer<moe::routers::TopKSoftmax<T>, moe::experts::SwiGLU<T>, moe::experts::ConstantExperts<T>,
                            moe::experts::CopyExperts<T>, moe::experts::ZeroExperts<T>>;

// MoE++ 0.6B's expert mix at test size: 8 FFN, 2 constant, 1 copy, 1 zero; top-2 without renormalisation.
template <class T>
MoEPP<T> make_layer(Index d, Index ff, std::uint64_t seed) {
  MoEPP<T> layer(
      moe::routers::TopKSoftmax<T>({.d_model = d, .d_ff = ff, .n_experts = 12, .top_k = 2}, {.renormalize = false}),
      moe::experts::SwiGLU<T>({.d_model = d, .d_ff = ff, .n_experts = 8, .top_k = 2}),
      moe::experts::ConstantExperts<T>(2, d), moe::experts::CopyExperts<T>(1, d), moe::experts::ZeroExperts<T>(1, d));
  layer.init(seed);
  return layer;
}

// Naive double output of expert `id` of the MoE++ layer on token x.
template <class T>
std::vector<double> naive_expert(const MoEPP<T>& layer, Index id, const T* x) {
  const Index d = layer.d_model();
  std::vector<double> out(static_cast<std::size_t>(d), 0.0);
  if (id < 8) {
    const auto& ffn = layer.template bank<0>();
    const auto silu = moe::reference::naive_activation("silu");
    std::vector<double> h(static_cast<std::size_t>(ffn.d_ff()));
    for (Index i = 0; i < ffn.d_ff(); ++i) {
      double g = 0, u = 0;
      for (Index j = 0; j < d; ++j) {
        g += double(ffn.w1(id)(i, j)) * double(x[j]);
        u += double(ffn.w3(id)(i, j)) * double(x[j]);
      }
      h[static_cast<std::size_t>(i)] = silu(g) * u;
    }
    for (Index o = 0; o < d; ++o)
      for (Index i = 0; i < ffn.d_ff(); ++i) out[static_cast<std::size_t>(o)] += double(ffn.w2(id)(o, i)) * h[static_cast<std::size_t>(i)];
  } else if (id < 10) {
    const auto& c = layer.template bank<1>();
    double s1 = 0, s2 = 0;
    for (Index j = 0; j < d; ++j) {
      s1 += double(c.wc(id - 8)(0, j)) * double(x[j]);
      s2 += double(c.wc(id - 8)(1, j)) * double(x[j]);
    }
    const double a1 = std::exp(s1) / (std::exp(s1) + std::exp(s2)), a2 = 1 - a1;
    for (Index j = 0; j < d; ++j) out[static_cast<std::size_t>(j)] = a1 * double(x[j]) + a2 * double(c.v(id - 8)(0, j));
  } else if (id == 10) {
    for (Index j = 0; j < d; ++j) out[static_cast<std::size_t>(j)] = double(x[j]);
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("MoE++ layer (FFN + constant + copy + zero) matches naive formulas", "[expert][layer]", float,
                   double) {
  const Index d = 24, ff = 40, T = 70;
  auto layer = make_layer<TestType>(d, ff, 5);
  moe::Rng rng(8);
  const RowMatrix<TestType> x = moe::test::normal_matrix<TestType>(rng, T, d);
  RowMatrix<TestType> y(T, d);
  const auto res = layer.forward(x, y);
  RowMatrix<double> ref = RowMatrix<double>::Zero(T, d);
  for (Index t = 0; t < T; ++t) {
    for (Index s = 0; s < 2; ++s) {
      const auto i = static_cast<std::size_t>(t * 2 + s);
      const auto e = naive_expert(layer, res.expert_ids[i], x.row(t).data());
      for (Index j = 0; j < d; ++j) ref(t, j) += double(res.expert_weights[i]) * e[static_cast<std::size_t>(j)];
    }
  }
  // Every kind was used (the test is not vacuous).
  for (Index e : {0, 8, 9, 10, 11}) {
    INFO("expert " << e);
    CHECK(res.tokens_per_expert[static_cast<std::size_t>(e)] > 0);
  }
  CHECK(moe::test::nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size())) <=
        (std::is_same_v<TestType, float> ? 1e-7 : 1e-24));
}

TEST_CASE("Copy experts with weight 1 return the input bitwise; zero experts return 0", "[expert][layer]") {
  using Layer = moe::MoELayer<moe::routers::TopKSoftmax<float>, moe::experts::CopyExperts<float>,
                              moe::experts::ZeroExperts<float>>;
  const Index d = 19;
  Layer layer(moe::routers::TopKSoftmax<float>({.d_model = d, .d_ff = 1, .n_experts = 2, .top_k = 1}),
              moe::experts::CopyExperts<float>(1, d), moe::experts::ZeroExperts<float>(1, d));
  layer.init(1);
  moe::Rng rng(2);
  RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 33, d);
  x.col(0).setConstant(1.0f);
  layer.router().gate()(0, 0) = 30;  // every token to the copy expert, top-1 renormalised: weight 1
  RowMatrix<float> y(33, d);
  layer.forward(x, y);
  REQUIRE(std::memcmp(x.data(), y.data(), sizeof(float) * static_cast<std::size_t>(x.size())) == 0);
  layer.router().gate()(0, 0) = -30;  // every token to the zero expert
  layer.forward(x, y);
  REQUIRE((y.array() == 0.0f).all());
}

TEST_CASE("A token routed only to zero-computation experts skips the FFN bank", "[expert][layer]") {
  const Index d = 16;
  auto layer = make_layer<float>(d, 32, 3);
  moe::Rng rng(4);
  RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 20, d);
  x.col(0).setConstant(1.0f);
  layer.router().gate()(10, 0) = 40;  // copy
  layer.router().gate()(11, 0) = 39;  // zero
  RowMatrix<float> y(20, d);
  const auto res = layer.forward(x, y);
  for (Index e = 0; e < 8; ++e) REQUIRE(res.tokens_per_expert[static_cast<std::size_t>(e)] == 0);
  REQUIRE(res.tokens_per_expert[10] == 20);
  REQUIRE(res.tokens_per_expert[11] == 20);
  for (Index t = 0; t < 20; ++t) {
    const auto s = static_cast<std::size_t>(2 * t + (res.expert_ids[static_cast<std::size_t>(2 * t)] == 10 ? 0 : 1));
    REQUIRE(res.expert_ids[s] == 10);
    for (Index j = 0; j < d; ++j) REQUIRE(y(t, j) == res.expert_weights[s] * x(t, j));  // copy only; zero adds 0
  }
}

TEST_CASE("MoE++ layer backward matches central finite differences in double", "[expert][layer][grad]") {
  const Index d = 6, ff = 5, T = 8;
  auto layer = make_layer<double>(d, ff, 11);
  moe::Rng rng(6);
  RowMatrix<double> x = moe::test::normal_matrix<double>(rng, T, d, 1.5);
  const RowMatrix<double> r = moe::test::normal_matrix<double>(rng, T, d);
  RowMatrix<double> y(T, d), dx(T, d);
  moe::TrainingContext<double> ctx;
  const auto res = layer.forward(x, y, ctx);
  Index zero_computation_slots = 0;
  for (Index id : res.expert_ids) zero_computation_slots += id >= 8;
  REQUIRE(zero_computation_slots > 0);
  layer.zero_grad();
  layer.backward(r, dx, ctx);
  const auto loss = [&] {
    RowMatrix<double> out(T, d);
    layer.forward(x, out);
    return (out.array() * r.array()).sum();
  };
  moe::test::check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  double constant_grad = 0;
  layer.visit_parameters([&](const std::string& name, moe::Parameter<double>& p) {
    const auto st = moe::test::check_gradient(name, p, loss, 40);
    if (name.rfind("bank1.", 0) == 0) constant_grad = std::max(constant_grad, st.max_abs_numeric);
  });
  REQUIRE(constant_grad > 1e-4);  // the constant experts were exercised
}

TEST_CASE("Zero-computation banks reject bad shapes", "[expert][error]") {
  REQUIRE_THROWS_WITH(moe::experts::ZeroExperts<float>(0, 4), Contains("ZeroExperts: n_experts = 0"));
  REQUIRE_THROWS_WITH(moe::experts::CopyExperts<float>(1, 0), Contains("CopyExperts: d_model = 0"));
  REQUIRE_THROWS_WITH(moe::experts::ConstantExperts<float>(-1, 4), Contains("ConstantExperts: n_experts = -1"));
  STATIC_REQUIRE(moe::experts::ZeroExperts<float>::zero_computation);
  STATIC_REQUIRE(moe::TrainableBank<moe::experts::ConstantExperts<double>>);
}
