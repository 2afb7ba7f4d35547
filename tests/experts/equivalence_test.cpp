// Equivalences (RELIABILITY.md I5): one FFN expert under k = 1 is a plain FFN; a bank whose experts all hold
// the same weights is one FFN, at bank level and through a layer with any k (renormalised weights sum to 1).

#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/presets.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

// A plain FFN in double on every row of x, with expert 0's weights of `bank`.
template <class Bank, class T = typename Bank::Scalar>
RowMatrix<double> plain_ffn(const Bank& bank, const RowMatrix<T>& x) {
  RowMatrix<double> y(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    const auto yt = moe::test::naive_ffn<T>("silu", true, {bank.w1(0), bank.w3(0), bank.w2(0)}, moe::test::row_of<T>(x, t));
    for (Index j = 0; j < x.cols(); ++j) y(t, j) = yt[std::size_t(j)];
  }
  return y;
}

// Copies expert 0's weights into every other expert.
template <class Bank>
void clone_expert_0(Bank& bank) {
  const Index w = bank.d_ff() * bank.d_model();
  for (Index e = 1; e < bank.n_experts(); ++e) {
    std::copy_n(bank.w1(0).data(), w, bank.w1(e).data());
    std::copy_n(bank.w3(0).data(), w, bank.w3(e).data());
    std::copy_n(bank.w2(0).data(), w, bank.w2(e).data());
  }
}

template <class T>
double layer_vs_plain(Index n_experts, Index top_k) {
  moe::MixtralMoEType<T> layer({.d_model = 24, .d_ff = 40, .n_experts = n_experts, .top_k = top_k});
  layer.init(5);
  clone_expert_0(layer.template bank<0>());
  moe::Rng rng(6);
  const RowMatrix<T> x = moe::test::normal_matrix<T>(rng, 13, 24);
  RowMatrix<T> y(13, 24);
  layer.forward(x, y);
  const RowMatrix<double> ref = plain_ffn(layer.template bank<0>(), x);
  return moe::test::nmse(ref.data(), y.data(), std::size_t(ref.size()));
}

}  // namespace

TEST_CASE("I5: one expert with k = 1 equals a plain FFN, through the layer", "[expert][equivalence]") {
  CHECK(layer_vs_plain<double>(1, 1) <= 1e-24);
  CHECK(layer_vs_plain<float>(1, 1) <= 1e-7);
}

TEST_CASE("I5: experts with identical weights equal one FFN, for any k", "[expert][equivalence]") {
  for (const Index k : {1, 2, 4}) {
    INFO("top_k = " << k);
    CHECK(layer_vs_plain<double>(4, k) <= 1e-24);
    CHECK(layer_vs_plain<float>(4, k) <= 1e-7);
  }
}

TEST_CASE("I5: a bank with identical experts equals one FFN on any grouping of rows", "[expert][equivalence]") {
  moe::experts::SwiGLU<double> bank({.d_model = 17, .d_ff = 33, .n_experts = 4, .top_k = 1});
  moe::Rng rng(8);
  bank.init(rng);
  clone_expert_0(bank);
  const RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, 10, 17);
  const RowMatrix<double> ys = moe::test::bank_forward(bank, xs, {0, 3, 3, 9, 10});
  const RowMatrix<double> ref = plain_ffn(bank, xs);
  CHECK(moe::test::nmse(ref.data(), ys.data(), std::size_t(ref.size())) <= 1e-24);
}
