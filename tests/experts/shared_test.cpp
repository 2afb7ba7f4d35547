// experts::Shared (DeepSeekMoE shared experts, Qwen2-MoE's sigmoid-gated shared expert): forward against a
// naive double sum, one shared expert bitwise equal to the routed bank on all rows, finite-difference
// gradients of the inner bank, the gate and the input, and the concepts it models.

#include <cmath>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/concepts.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/experts/shared.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::experts::NoSharedGate;
using moe::experts::Shared;
using moe::experts::SigmoidSharedGate;
using moe::experts::SwiGLU;

static_assert(moe::TrainableSharedBank<Shared<SwiGLU<float>>>);
static_assert(moe::TrainableSharedBank<Shared<SwiGLU<double>, SigmoidSharedGate>>);
static_assert(!moe::ExpertBank<Shared<SwiGLU<float>>>, "shared banks take no routed slots");

namespace {

template <class Bank, class T = typename Bank::Scalar>
RowMatrix<T> shared_forward(const Bank& bank, const RowMatrix<T>& x) {
  RowMatrix<T> y = RowMatrix<T>::Constant(x.rows(), bank.d_model(), T(-99));
  moe::test::with_measured_arena([&](moe::Arena& arena) {
    if (arena.measuring())
      bank.forward(moe::ConstMatrixView<T>::shape_only(x.rows(), bank.d_model()),
                   moe::MatrixView<T>::shape_only(x.rows(), bank.d_model()), arena);
    else
      bank.forward(x, y, arena);
  });
  return y;
}

template <class T, class Gate>
void check_forward(double bound) {
  Shared<SwiGLU<T>, Gate> bank({.d_model = 19, .d_ff = 40, .n_experts = 2, .top_k = 1});
  moe::Rng rng(13);
  bank.init(rng);
  const RowMatrix<T> x = moe::test::normal_matrix<T>(rng, 9, 19);
  const RowMatrix<T> y = shared_forward(bank, x);
  RowMatrix<double> ref = RowMatrix<double>::Zero(9, 19);
  for (Index t = 0; t < 9; ++t) {
    const auto xt = moe::test::row_of<T>(x, t);
    double g = 1;
    if constexpr (Shared<SwiGLU<T>, Gate>::gated) g = 1 / (1 + std::exp(-moe::test::naive_linear<T>(bank.gate(), xt)[0]));
    for (Index e = 0; e < 2; ++e) {
      const auto& in = bank.inner();
      const auto ye = moe::test::naive_ffn<T>("silu", true, {in.w1(e), in.w3(e), in.w2(e)}, xt);
      for (Index j = 0; j < 19; ++j) ref(t, j) += g * ye[static_cast<std::size_t>(j)];
    }
  }
  CHECK(moe::test::nmse(ref.data(), y.data(), static_cast<std::size_t>(ref.size())) <= bound);
}

}  // namespace

TEST_CASE("Shared experts sum every expert on every token, optionally sigmoid-gated", "[expert]") {
  check_forward<float, NoSharedGate>(1e-7);
  check_forward<double, NoSharedGate>(1e-24);
  check_forward<float, SigmoidSharedGate>(1e-7);
  check_forward<double, SigmoidSharedGate>(1e-24);
}

TEST_CASE("One ungated shared expert equals the routed bank with every row on that expert, bitwise", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 33, .d_ff = 300, .n_experts = 1, .top_k = 1};
  Shared<SwiGLU<float>> shared(cfg);
  moe::Rng rng(2);
  shared.init(rng);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 11, 33);
  REQUIRE(shared_forward(shared, x) == moe::test::bank_forward(shared.inner(), x, {0, 11}));
}

TEST_CASE("Shared experts backward matches central finite differences in double", "[expert][grad]") {
  const auto check = [](auto bank) {
    moe::Rng rng(17);
    bank.init(rng);
    RowMatrix<double> x = moe::test::normal_matrix<double>(rng, 4, bank.d_model());
    const double biggest = moe::test::check_bank_gradients(
        bank, x, bank.d_model(), [&](moe::MatrixView<double> y, moe::Arena& arena) { bank.forward(x, y, arena); },
        [&](moe::ConstMatrixView<double> dy, moe::MatrixView<double> dx, moe::Arena& arena) {
          bank.backward(x, dy, dx, arena);
        });
    REQUIRE(biggest > 1e-3);
  };
  const moe::MoEConfig cfg{.d_model = 5, .d_ff = 7, .n_experts = 2, .top_k = 1};
  check(Shared<SwiGLU<double>>(cfg));
  check(Shared<SwiGLU<double>, SigmoidSharedGate>(cfg));
  check(Shared<moe::experts::FFN<double, moe::kernels::GELU, false>, SigmoidSharedGate>(
      moe::experts::FFN<double, moe::kernels::GELU, false>(cfg, {.bias = true})));
}
