// experts::LoRA (LLaVA-MoLE): forward against a naive double loop over the merged weights W + s B A,
// gradients of A, B, the input (and the base only when asked) against finite differences with B != 0,
// B = 0 equal to the frozen base FFN bit for bit, the zero-token expert's exact zero gradient, and a small
// bank opening no OpenMP parallel region.

#include <algorithm>
#include <atomic>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/experts/ffn.hpp>
#include <moe/experts/lora.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"
#include "support/threads.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

// W + s B A in double: the weight a merged LoRA checkpoint would hold.
template <class T, class Adapter>
RowMatrix<double> merged(moe::ConstMatrixView<T> w, const Adapter& lora, Index e) {
  RowMatrix<double> m(w.rows(), w.cols());
  for (Index i = 0; i < w.rows(); ++i) {
    for (Index j = 0; j < w.cols(); ++j) {
      double d = 0;
      for (Index k = 0; k < lora.rank(); ++k) d += double(lora.b(e)(i, k)) * double(lora.a(e)(k, j));
      m(i, j) = double(w(i, j)) + double(lora.scale()) * d;
    }
  }
  return m;
}

template <class Bank>
RowMatrix<double> naive_lora(const Bank& bank, const RowMatrix<typename Bank::Scalar>& xs,
                             const std::vector<Index>& offsets) {
  RowMatrix<double> ys(xs.rows(), bank.d_model());
  for (Index e = 0; e < bank.n_experts(); ++e) {
    const RowMatrix<double> w1 = merged(bank.w1(), bank.w1_lora(), e), w2 = merged(bank.w2(), bank.w2_lora(), e);
    RowMatrix<double> w3;
    if constexpr (Bank::gated) w3 = merged(bank.w3(), bank.w3_lora(), e);
    const moe::test::NaiveFFNWeights<double> w{w1, w3, w2};
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      const auto y = moe::test::naive_ffn(Bank::Activation::name(), Bank::gated, w, moe::test::row_of<typename Bank::Scalar>(xs, r));
      for (Index o = 0; o < bank.d_model(); ++o) ys(r, o) = y[static_cast<std::size_t>(o)];
    }
  }
  return ys;
}

const moe::experts::LoRAOptions k_nonzero_b{.rank = 3, .alpha = 6, .b_init = moe::experts::Normal{.std = 0.5}};

template <class Bank>
void check_forward(const moe::MoEConfig& cfg, const std::vector<Index>& counts, double bound) {
  Bank bank(cfg, k_nonzero_b);
  INFO(Bank::Activation::name() << " gated=" << Bank::gated << " d=" << cfg.d_model << " ff=" << cfg.d_ff);
  moe::test::check_bank_forward(bank, counts, naive_lora<Bank>, bound);
}

}  // namespace

TEST_CASE("LoRA bank matches a naive loop over the merged weights W + (alpha/r) B A", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 33, .d_ff = 70, .n_experts = 4, .top_k = 1};
  const std::vector<Index> counts = {3, 0, 17, 1};  // expert 1 receives no row
  check_forward<moe::experts::LoRASwiGLU<float>>(cfg, counts, 1e-7);
  check_forward<moe::experts::LoRASwiGLU<double>>(cfg, counts, 1e-24);
  check_forward<moe::experts::LoRA<float, moe::kernels::GELU, false>>(cfg, counts, 1e-7);
  check_forward<moe::experts::LoRA<double, moe::kernels::ReLU, false>>({.d_model = 1, .d_ff = 1, .n_experts = 1, .top_k = 1},
                                                                      {4}, 1e-24);
}

TEST_CASE("LoRA bank with B = 0 equals the frozen base FFN", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 40, .d_ff = 300, .n_experts = 3, .top_k = 1};
  moe::experts::LoRASwiGLU<float> lora(cfg, {.rank = 4, .alpha = 8});  // B starts at zero
  moe::Rng rng(5);
  lora.init(rng);
  // The same base in every expert of an FFN bank. The FFN bank runs packed-panel kernels, which sum in
  // another order than the LoRA base's products: equal within RELIABILITY.md N1, not bitwise.
  moe::experts::SwiGLU<float> base(cfg);
  for (Index e = 0; e < 3; ++e) {
    std::copy_n(lora.w1().data(), 300 * 40, base.w1(e).data());
    std::copy_n(lora.w3().data(), 300 * 40, base.w3(e).data());
    std::copy_n(lora.w2().data(), 40 * 300, base.w2(e).data());
  }
  const RowMatrix<float> xs = moe::test::normal_matrix<float>(rng, 12, 40);
  const std::vector<Index> offsets = {0, 5, 5, 12};
  const RowMatrix<float> ys = moe::test::bank_forward(lora, xs, offsets);
  const RowMatrix<float> ref = moe::test::bank_forward(base, xs, offsets);
  REQUIRE(lora.w1_lora().a(2)(0, 0) != 0.0f);  // A is random: only B = 0 makes the delta vanish
  REQUIRE(moe::test::nmse(ref.data(), ys.data(), static_cast<std::size_t>(ref.size())) <= 1e-7);
  // Bitwise: with B = 0 the adapters add exactly +0, so zeroing A as well changes no bit.
  auto no_adapter = lora;
  no_adapter.visit_parameters([](std::string_view name, moe::Parameter<float>& p) {
    if (name.ends_with("lora_a")) std::fill_n(p.data(), p.rows() * p.cols(), 0.0f);
  });
  REQUIRE(moe::test::bank_forward(no_adapter, xs, offsets) == ys);
}

TEST_CASE("LoRA bank backward matches central finite differences in double (B != 0)", "[expert][grad]") {
  const auto check = [](auto bank, const std::vector<Index>& counts) {
    moe::Rng rng(21);
    bank.init(rng);
    const auto offsets = moe::test::offsets_from(counts);
    RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, offsets.back(), bank.d_model());
    const double biggest = moe::test::check_bank_gradients(
        bank, xs, bank.d_model(),
        [&](moe::MatrixView<double> ys, moe::Arena& arena) { bank.forward(xs, offsets.data(), ys, arena); },
        [&](moe::ConstMatrixView<double> dys, moe::MatrixView<double> dxs, moe::Arena& arena) {
          bank.backward(xs, offsets.data(), dys, dxs, arena);
        });
    REQUIRE(biggest > 1e-3);
    return bank;
  };
  const moe::MoEConfig cfg{.d_model = 5, .d_ff = 7, .n_experts = 3, .top_k = 1};
  using moe::experts::LoRA;
  auto frozen = check(moe::experts::LoRASwiGLU<double>(cfg, k_nonzero_b), {2, 0, 3});
  check(LoRA<double, moe::kernels::GELUTanh, false>(cfg, k_nonzero_b), {1, 3, 2});
  // The frozen base is state, not a parameter: visit_state gives w1, w3, w2 (their values), and no parameter of
  // that name trains.
  std::vector<std::string> state;
  frozen.visit_state([&](std::string_view name, std::span<double> values) {
    state.emplace_back(name);
    const auto base = name == "w1"   ? std::as_const(frozen).w1()
                      : name == "w3" ? std::as_const(frozen).w3()
                                     : std::as_const(frozen).w2();
    REQUIRE(static_cast<Index>(values.size()) == base.rows() * base.cols());
    REQUIRE(std::equal(values.begin(), values.end(), base.data()));
  });
  REQUIRE(state == std::vector<std::string>{"w1", "w3", "w2"});
  frozen.visit_parameters(
      [&](std::string_view name, moe::Parameter<double>&) { REQUIRE(name.find("lora") != std::string_view::npos); });
  // Asked to, the base trains too: visit_parameters then includes w1, w3, w2 and they pass the check.
  auto opts = k_nonzero_b;
  opts.train_base = true;
  auto trained = check(moe::experts::LoRASwiGLU<double>(cfg, opts), {2, 0, 3});
  Index base_params = 0;
  trained.visit_parameters([&](std::string_view name, moe::Parameter<double>&) { base_params += name.size() == 2; });
  REQUIRE(base_params == 3);
}

TEST_CASE("LoRA bank: an expert without rows keeps exactly zero adapter gradients over a NaN-poisoned workspace",
          "[expert][grad]") {
  moe::experts::LoRASwiGLU<float> bank({.d_model = 16, .d_ff = 24, .n_experts = 3, .top_k = 1}, k_nonzero_b);
  moe::test::check_empty_expert_gradient(bank);
}

namespace {

// SiLU that records whether it ever ran inside an active OpenMP parallel region.
struct ParallelProbe : moe::kernels::SiLU {
  static inline std::atomic<bool> in_parallel{false};
  template <class V>
  static V apply(const V& x) {
    note();
    return SiLU::apply(x);
  }
  template <class T>
  static T derivative(T x) {
    note();
    return SiLU::derivative(x);
  }
  static void note() {
#if defined(_OPENMP)
    if (omp_in_parallel()) in_parallel = true;
#endif
  }
};

// Whether forward + backward over `rows` rows ran anything in a parallel region, for each thread count.
bool lora_went_parallel(Index d_model, Index d_ff, Index rows) {
  moe::experts::LoRA<double, ParallelProbe> bank({.d_model = d_model, .d_ff = d_ff, .n_experts = 3, .top_k = 1},
                                                 k_nonzero_b);
  moe::Rng rng(5);
  bank.init(rng);
  const std::vector<Index> offsets = {0, rows / 3, rows / 2, rows};
  const RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, rows, d_model);
  const RowMatrix<double> dys = moe::test::normal_matrix<double>(rng, rows, d_model);
  RowMatrix<double> dxs(rows, d_model);
  ParallelProbe::in_parallel = false;
  moe::test::for_each_thread_count([&](int) {
    moe::test::bank_forward(bank, xs, offsets);
    moe::Arena measure;
    bank.backward(moe::ConstMatrixView<double>::shape_only(rows, d_model), offsets.data(),
                  moe::ConstMatrixView<double>::shape_only(rows, d_model),
                  moe::MatrixView<double>::shape_only(rows, d_model), measure);
    moe::Workspace ws;
    ws.reserve(measure.peak());
    moe::Arena arena(ws);
    bank.backward(xs, offsets.data(), dys, dxs, arena);
  });
  return ParallelProbe::in_parallel;
}

}  // namespace

TEST_CASE("LoRA bank: below k_parallel_min_work forward and backward stay on the calling thread", "[expert]") {
  // A parallel region costs microseconds, and milliseconds when another process holds a core (the team waits
  // for a descheduled thread): a small bank must not open one, whatever the thread count.
  REQUIRE_FALSE(lora_went_parallel(4, 8, 9));
#if defined(_OPENMP)
  // The probe does see a region when the work is large enough (1 << 16 multiply-adds and more).
  REQUIRE(lora_went_parallel(16, 64, 96));
#endif
}

TEST_CASE("LoRA options are validated", "[expert]") {
  REQUIRE_THROWS_WITH((moe::experts::LoRASwiGLU<float>({.d_model = 4, .d_ff = 4, .n_experts = 2, .top_k = 1},
                                                       {.rank = 0})),
                      Catch::Contains("rank = 0"));
}
