// experts::FFN: the bank on grouped rows against a naive double per-expert loop, for gated and plain
// variants, and the weight layout.

#include <algorithm>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/concepts.hpp>
#include <moe/experts/ffn.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"
#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;

namespace {

template <class Bank>
void check_bank(const moe::MoEConfig& cfg, const std::vector<Index>& counts, double bound) {
  Bank bank(cfg);
  INFO(Bank::Activation::name() << " gated=" << Bank::gated << " d=" << cfg.d_model << " ff=" << cfg.d_ff);
  moe::test::check_bank_forward(bank, counts, moe::test::naive_ffn_bank<Bank>, bound, 31);
}

}  // namespace

TEST_CASE("FFN bank matches a naive per-expert loop", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 33, .d_ff = 300, .n_experts = 4, .top_k = 1};
  const std::vector<Index> counts = {3, 0, 17, 1};  // expert 1 receives no row
  check_bank<moe::experts::SwiGLU<float>>(cfg, counts, 1e-7);
  check_bank<moe::experts::SwiGLU<double>>(cfg, counts, 1e-24);
  check_bank<moe::experts::FFN<float, moe::kernels::GELU, true>>(cfg, counts, 1e-7);
  check_bank<moe::experts::FFN<float, moe::kernels::ReLU, false>>(cfg, counts, 1e-7);
  check_bank<moe::experts::FFN<double, moe::kernels::GELUTanh, false>>(cfg, counts, 1e-24);
  // Tile edges of the bank's column split (256) and of the kernels.
  check_bank<moe::experts::SwiGLU<float>>({.d_model = 257, .d_ff = 255, .n_experts = 2, .top_k = 1}, {5, 2}, 1e-7);
  check_bank<moe::experts::SwiGLU<float>>({.d_model = 1, .d_ff = 1, .n_experts = 1, .top_k = 1}, {4}, 1e-7);
  // Several row tiles and work items (128 columns) per expert.
  check_bank<moe::experts::SwiGLU<float>>({.d_model = 130, .d_ff = 129, .n_experts = 3, .top_k = 1}, {30, 0, 13},
                                          1e-7);
}

TEST_CASE("FFN banks with bf16 and int8 weight storage stay close to the f32 naive loop", "[expert]") {
  // RELIABILITY.md N4 whole-tensor sanity: NMSE <= 5e-4 against the unrounded f32 weights.
  using moe::kernels::SiLU;
  const moe::MoEConfig cfg{.d_model = 130, .d_ff = 257, .n_experts = 3, .top_k = 1};
  const std::vector<Index> counts = {30, 0, 13};
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::BF16Weights>>(cfg, counts, 5e-4);
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::Int8Weights>>(cfg, counts, 5e-4);
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::scalar, moe::kernels::BF16Weights>>(cfg, counts, 5e-4);
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::scalar, moe::kernels::Int8Weights>>(cfg, counts, 5e-4);
  check_bank<moe::experts::FFN<float, moe::kernels::ReLU, false, moe::kernels::default_arch, moe::kernels::Int8Weights>>(
      {.d_model = 33, .d_ff = 31, .n_experts = 2, .top_k = 1}, {5, 2}, 5e-4);
  check_bank<moe::experts::FFN<float, moe::kernels::GELU, true, moe::kernels::default_arch, moe::kernels::BF16Weights>>(
      {.d_model = 33, .d_ff = 31, .n_experts = 2, .top_k = 1}, {5, 2}, 5e-4);
}

TEST_CASE("FFN banks with int4 weight storage stay within q4 rounding noise of the f32 naive loop", "[expert]") {
  // Each q4 projection adds noise d^2 / 12 ~ 0.008 of the weights' variance (kernels_int4_gemm_test); a SwiGLU
  // bank passes it through three projections: NMSE <= 0.05 against the unrounded f32 weights.
  using moe::kernels::SiLU;
  using G64 = moe::kernels::Int4Weights<64, moe::kernels::F32Scales>;
  const moe::MoEConfig cfg{.d_model = 130, .d_ff = 257, .n_experts = 3, .top_k = 1};
  const std::vector<Index> counts = {30, 0, 13};
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::Int4Weights<>>>(cfg, counts,
                                                                                                            0.05);
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::scalar, moe::kernels::Int4Weights<>>>(cfg, counts,
                                                                                                      0.05);
  check_bank<moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, G64>>(cfg, counts, 0.05);
  check_bank<
      moe::experts::FFN<float, moe::kernels::ReLU, false, moe::kernels::default_arch, moe::kernels::Int4Weights<>>>(
      {.d_model = 33, .d_ff = 31, .n_experts = 2, .top_k = 1}, {5, 2}, 0.05);
}

TEST_CASE("FFN re-packs its panels after a write through a non-const accessor", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 20, .d_ff = 40, .n_experts = 2, .top_k = 1};
  moe::experts::SwiGLU<float> bank(cfg);
  moe::Rng rng(3);
  bank.init(rng);
  CHECK_FALSE(bank.panels_current());  // packing waits for the first forward
  moe::test::Rng trng(4);
  const RowMatrix<float> xs = moe::test::normal_matrix<float>(trng, 3, cfg.d_model);
  const std::vector<Index> offsets{0, 2, 3};
  moe::Arena measure;
  bank.forward(moe::ConstMatrixView<float>::shape_only(3, cfg.d_model), nullptr,
               moe::MatrixView<float>::shape_only(3, cfg.d_model), measure);
  moe::Workspace ws(measure.peak());
  RowMatrix<float> before(3, cfg.d_model), after(3, cfg.d_model);
  {
    moe::Arena arena(ws);
    bank.forward(xs, offsets.data(), before, arena);
  }
  CHECK(bank.panels_current());

  bank.w2(1)(5, 7) += 1.0f;  // expert 1 owns row 2
  CHECK_FALSE(bank.panels_current());
  {
    moe::Arena arena(ws);
    bank.forward(xs, offsets.data(), after, arena);
  }
  CHECK(bank.panels_current());
  CHECK(after.row(2)(5) != before.row(2)(5));
  CHECK(after.topRows(2) == before.topRows(2));

  // A write through the parameter visitor (what optimizers and checkpoint loading do) is seen too.
  bank.visit_parameters([](std::string_view name, moe::Parameter<float>& p) {
    if (name == "w1") p.data()[0] += 1.0f;  // expert 0, hidden unit 0, input 0
  });
  CHECK_FALSE(bank.panels_current());
  RowMatrix<float> third(3, cfg.d_model);
  {
    moe::Arena arena(ws);
    bank.forward(xs, offsets.data(), third, arena);
  }
  CHECK(bank.panels_current());
  CHECK(third.topRows(2) != after.topRows(2));
  // A copy carries its own panels; a const bank never marks them stale.
  const moe::experts::SwiGLU<float> copy = bank;
  CHECK(copy.panels_current());
  CHECK(copy.w1(0)(0, 0) == bank.w1(0)(0, 0));
  CHECK(copy.panels_current());
  // After a write through a kept pointer, repack_on_next_forward() is the documented hook.
  bank.repack_on_next_forward();
  CHECK_FALSE(bank.panels_current());

  // Packing is per expert and lazy: a forward packs the experts it gives rows to, the others wait.
  bank.w1(1)(0, 0) += 1.0f;
  const std::vector<Index> only_expert_0{0, 3, 3};
  RowMatrix<float> fourth(3, cfg.d_model);
  {
    moe::Arena arena(ws);
    bank.forward(xs, only_expert_0.data(), fourth, arena);
  }
  CHECK(bank.panels_current(0));
  CHECK_FALSE(bank.panels_current(1));
  {
    moe::Arena arena(ws);
    bank.forward(xs, offsets.data(), fourth, arena);
  }
  CHECK(bank.panels_current());
  moe::experts::SwiGLU<float> fresh = bank;  // a copy packs from scratch: the lazily packed panels agree
  fresh.repack_on_next_forward();
  RowMatrix<float> from_fresh(3, cfg.d_model);
  {
    moe::Arena arena(ws);
    std::as_const(fresh).forward(xs, offsets.data(), from_fresh, arena);
  }
  CHECK(from_fresh == fourth);
}

TEST_CASE("FFN weights use the Hugging Face (out_features, in_features) layout", "[expert]") {
  moe::experts::SwiGLU<float> bank({.d_model = 6, .d_ff = 10, .n_experts = 3, .top_k = 1});
  REQUIRE(bank.w1(2).rows() == 10);
  REQUIRE(bank.w1(2).cols() == 6);
  REQUIRE(bank.w3(0).rows() == 10);
  REQUIRE(bank.w2(1).rows() == 6);
  REQUIRE(bank.w2(1).cols() == 10);
  // Experts are stored one after another: expert e's matrix starts where e-1's ends.
  REQUIRE(bank.w1(1).data() == bank.w1(0).data() + 60);
  REQUIRE(bank.w2(2).data() == bank.w2(1).data() + 60);
  moe::Rng rng(1);
  bank.init(rng);
  const float bound = 1.0f / std::sqrt(6.0f);
  for (Index i = 0; i < 10; ++i)
    for (Index j = 0; j < 6; ++j) REQUIRE(std::abs(bank.w1(2)(i, j)) <= bound);
}

TEST_CASE("FFN bank: an expert without rows keeps an exactly zero gradient over a NaN-poisoned workspace",
          "[expert][grad]") {
  moe::experts::SwiGLU<float> bank({.d_model = 16, .d_ff = 24, .n_experts = 3, .top_k = 1});
  moe::test::check_empty_expert_gradient(bank);
}

TEST_CASE("FFN banks give the same bits for any thread count, for every storage", "[expert]") {
  const moe::MoEConfig cfg{.d_model = 70, .d_ff = 200, .n_experts = 3, .top_k = 1};
  const std::vector<Index> offsets{0, 29, 29, 40};
  auto run = [&]<class Bank>(const Bank& bank, int threads) {
    moe::test::Rng rng(9);
    const RowMatrix<float> xs = moe::test::normal_matrix<float>(rng, 40, cfg.d_model);
    moe::Arena measure;
    bank.forward(moe::ConstMatrixView<float>::shape_only(40, cfg.d_model), nullptr,
                 moe::MatrixView<float>::shape_only(40, cfg.d_model), measure);
    moe::Workspace ws(measure.peak());
    moe::Arena arena(ws);
    RowMatrix<float> ys(40, cfg.d_model);
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#endif
    bank.forward(xs, offsets.data(), ys, arena);
#if defined(_OPENMP)
    omp_set_num_threads(saved);
#endif
    return ys;
  };
  auto check = [&]<class Bank>(Bank bank) {
    moe::Rng rng(2);
    bank.init(rng);
    const RowMatrix<float> one = run(std::as_const(bank), 1);
    for (const int t : {2, 3, 4}) CHECK(run(std::as_const(bank), t) == one);
  };
  check(moe::experts::SwiGLU<float>(cfg));
  check(moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, moe::kernels::BF16Weights>(cfg));
  check(moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, moe::kernels::Int8Weights>(cfg));
  check(
      moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, moe::kernels::Int4Weights<>>(cfg));
}

TEST_CASE("FFN forward_tokens gives forward()'s bits on the gathered rows, for every storage", "[expert]") {
  // 23 tokens, 40 grouped rows: tokens routed to several experts, to one, or to none; expert 1 gets no row.
  const moe::MoEConfig cfg{.d_model = 70, .d_ff = 200, .n_experts = 3, .top_k = 2};
  const Index n_tokens = 23, n_rows = 40;
  const std::vector<Index> offsets{0, 29, 29, n_rows};
  std::vector<Index> row_token(static_cast<std::size_t>(n_rows));
  for (Index r = 0; r < n_rows; ++r) row_token[static_cast<std::size_t>(r)] = (r * 7) % (n_tokens - 2);
  moe::test::Rng rng(4);
  const RowMatrix<float> x = moe::test::normal_matrix<float>(rng, n_tokens, cfg.d_model);
  RowMatrix<float> xs(n_rows, cfg.d_model);
  for (Index r = 0; r < n_rows; ++r) xs.row(r) = x.row(row_token[static_cast<std::size_t>(r)]);

  auto check = [&]<class Bank>(Bank bank) {
    INFO("storage " << Bank::StoragePolicy::name());
    moe::Rng init(2);
    bank.init(init);
    const auto shape = moe::MatrixView<float>::shape_only(n_rows, cfg.d_model);
    moe::Arena measure;
    bank.forward(shape, nullptr, shape, measure);
    const std::size_t grouped_bytes = measure.peak();
    moe::Arena measure_tokens;
    bank.forward_tokens(moe::ConstMatrixView<float>::shape_only(n_tokens, cfg.d_model), nullptr, nullptr, shape,
                        measure_tokens);
    moe::Workspace ws(std::max(grouped_bytes, measure_tokens.peak()));
    RowMatrix<float> y_grouped(n_rows, cfg.d_model), y_tokens(n_rows, cfg.d_model);
    moe::Arena a1(ws);
    std::as_const(bank).forward(xs, offsets.data(), y_grouped, a1);
    moe::Arena a2(ws);
    std::as_const(bank).forward_tokens(x, row_token.data(), offsets.data(), y_tokens, a2);
    CHECK(y_tokens == y_grouped);
    CHECK(y_tokens.allFinite());
  };
  using moe::kernels::SiLU;
  check(moe::experts::SwiGLU<float>(cfg));
  check(moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::BF16Weights>(cfg));
  check(moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::Int8Weights>(cfg));
  check(moe::experts::FFN<float, SiLU, true, moe::kernels::scalar, moe::kernels::Int8Weights>(cfg));
  check(moe::experts::FFN<float, SiLU, true, moe::kernels::default_arch, moe::kernels::Int4Weights<>>(cfg));
  check(moe::experts::FFN<float, moe::kernels::ReLU, false, moe::kernels::scalar, moe::kernels::BF16Weights>(cfg));
}

namespace {

// A PackedOnly bank packed expert by expert from a trainable bank's weights.
template <class Storage, class Act, bool Gated>
void check_packed_only(const moe::MoEConfig& cfg, const std::vector<Index>& counts) {
  using Trainable = moe::experts::FFN<float, Act, Gated, moe::kernels::default_arch, Storage>;
  using Packed = moe::experts::FFN<float, Act, Gated, moe::kernels::default_arch, moe::kernels::PackedOnly<Storage>>;
  STATIC_REQUIRE(Trainable::trainable);
  STATIC_REQUIRE(!Packed::trainable);
  STATIC_REQUIRE(moe::ExpertBank<Packed>);
  STATIC_REQUIRE(!moe::TrainableBank<Packed>);
  Trainable a(cfg);
  moe::Rng rng(5);
  a.init(rng);
  const Trainable& ca = a;
  Packed b(cfg);
  for (Index e = 0; e < cfg.n_experts; ++e) {
    if constexpr (Gated) {
      b.pack_expert_hidden(e, ca.w1(e), ca.w3(e));
    } else {
      b.pack_expert_hidden(e, ca.w1(e));
    }
    b.pack_expert_out(e, ca.w2(e));
  }
  const auto offsets = moe::test::offsets_from(counts);
  moe::Rng x_rng(9);
  const auto xs = moe::test::normal_matrix<float>(x_rng, offsets.back(), cfg.d_model);
  INFO(Storage::name() << " gated=" << Gated << " d=" << cfg.d_model << " ff=" << cfg.d_ff);
  CHECK(moe::test::bank_forward(a, xs, offsets) == moe::test::bank_forward(b, xs, offsets));
}

}  // namespace

TEST_CASE("A PackedOnly bank packed expert by expert runs bitwise like the trainable bank", "[expert]") {
  using moe::kernels::SiLU;
  const moe::MoEConfig odd{.d_model = 33, .d_ff = 31, .n_experts = 3, .top_k = 1};
  check_packed_only<moe::kernels::NativeWeights, SiLU, true>(odd, {5, 0, 9});
  check_packed_only<moe::kernels::BF16Weights, SiLU, true>(odd, {5, 0, 9});
  check_packed_only<moe::kernels::Int8Weights, SiLU, true>(odd, {5, 0, 9});
  check_packed_only<moe::kernels::Int8Weights, moe::kernels::ReLU, false>(odd, {1, 4, 2});
  check_packed_only<moe::kernels::Int4Weights<>, SiLU, true>(odd, {5, 0, 9});
  check_packed_only<moe::kernels::Int4Weights<64, moe::kernels::F32Scales>, moe::kernels::ReLU, false>(odd, {1, 4, 2});
  check_packed_only<moe::kernels::BF16Weights, SiLU, true>({.d_model = 130, .d_ff = 257, .n_experts = 2, .top_k = 1},
                                                           {30, 13});
}

TEST_CASE("A PackedOnly bank rejects a wrong expert or shape, and biases", "[expert][bad_input]") {
  using Packed = moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch,
                                   moe::kernels::PackedOnly<moe::kernels::BF16Weights>>;
  const moe::MoEConfig cfg{.d_model = 8, .d_ff = 6, .n_experts = 2, .top_k = 1};
  Packed bank(cfg);
  RowMatrix<float> w(6, 8), wrong(8, 6);
  REQUIRE_THROWS_WITH(bank.pack_expert_hidden(2, w, w), Catch::Matchers::Contains("expert 2 of 2"));
  REQUIRE_THROWS_WITH(bank.pack_expert_hidden(0, w, wrong), Catch::Matchers::Contains("w3 is (8, 6), expected (6, 8)"));
  REQUIRE_THROWS_WITH(bank.pack_expert_out(0, w), Catch::Matchers::Contains("w2 is (6, 8), expected (8, 6)"));
  REQUIRE_THROWS_WITH(Packed(cfg, {.bias = true}), Catch::Matchers::Contains("PackedOnly storage takes no biases"));
}
