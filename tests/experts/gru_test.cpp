// experts::GRU (Hecto): forward over carried-state chains against a naive double GRU that walks the tokens
// in time order (token-level routing with carried state, and sequence-level routing), backpropagation
// through time against finite differences, bad prev_rows rejected before any write, and the zero-token
// expert's exact zero gradient.

#include <cmath>
#include <map>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/concepts.hpp>
#include <moe/experts/gru.hpp>
#include <moe/routing_plan.hpp>

#include "support/banks.hpp"
#include "support/nmse.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::experts::GRU;
using moe::test::Vec;

static_assert(moe::TrainableBank<GRU<float>>);

namespace {

// A routed batch: tokens with their sequence and expert, grouped by expert in token order (as the plan does).
struct Batch {
  std::vector<Index> sequence, expert, row_token, offsets, prev_rows;
};

Batch make_batch(const std::vector<Index>& sequence, const std::vector<Index>& expert, Index n_experts) {
  Batch b{sequence, expert, {}, {0}, {}};
  for (Index e = 0; e < n_experts; ++e) {
    for (Index t = 0; t < Index(expert.size()); ++t)
      if (expert[static_cast<std::size_t>(t)] == e) b.row_token.push_back(t);
    b.offsets.push_back(Index(b.row_token.size()));
  }
  b.prev_rows.resize(b.row_token.size());
  moe::carried_state_rows(b.offsets.data(), n_experts, b.row_token.data(), b.sequence.data(),
                                    b.prev_rows.data());
  return b;
}

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

// One GRU step in double, straight from the torch.nn.GRUCell formulas.
template <class T>
Vec naive_step(const GRU<T>& bank, Index e, const Vec& x, const Vec& h) {
  const Index d = bank.d_model();
  const Vec gi = moe::test::naive_linear<T>(bank.w_ih(e), x, bank.b_ih(e).data());
  const Vec gh = moe::test::naive_linear<T>(bank.w_hh(e), h, bank.b_hh(e).data());
  Vec out(static_cast<std::size_t>(d));
  for (std::size_t j = 0; j < std::size_t(d); ++j) {
    const double r = sigmoid(gi[j] + gh[j]), z = sigmoid(gi[d + j] + gh[d + j]);
    const double n = std::tanh(gi[2 * d + j] + r * gh[2 * d + j]);
    out[j] = (1 - z) * n + z * h[j];
  }
  return out;
}

// Walks the tokens in time order; each expert keeps one state per sequence (zero at the sequence's first
// token routed to it): the definition of token-level routing with carried state.
template <class T>
RowMatrix<double> naive_gru(const GRU<T>& bank, const RowMatrix<T>& xs, const Batch& b) {
  RowMatrix<double> ys(xs.rows(), bank.d_model());
  std::map<std::pair<Index, Index>, Vec> state;  // (expert, sequence) -> h
  for (Index t = 0; t < Index(b.expert.size()); ++t) {
    const Index e = b.expert[std::size_t(t)], seq = b.sequence[std::size_t(t)];
    Index r = b.offsets[std::size_t(e)];
    while (b.row_token[std::size_t(r)] != t) ++r;
    auto it = state.try_emplace({e, seq}, Vec(std::size_t(bank.d_model()), 0.0)).first;
    it->second = naive_step(bank, e, moe::test::row_of<T>(xs, r), it->second);
    for (Index j = 0; j < bank.d_model(); ++j) ys(r, j) = it->second[std::size_t(j)];
  }
  return ys;
}

template <class T>
RowMatrix<T> gru_forward(const GRU<T>& bank, const RowMatrix<T>& xs, const Batch& b) {
  RowMatrix<T> ys = RowMatrix<T>::Constant(xs.rows(), bank.d_model(), T(-99));
  moe::test::with_measured_arena([&](moe::Arena& arena) {
    if (arena.measuring())
      bank.forward(moe::ConstMatrixView<T>::shape_only(xs.rows(), bank.d_model()), nullptr, nullptr,
                   moe::MatrixView<T>::shape_only(xs.rows(), bank.d_model()), arena);
    else
      bank.forward(xs, b.offsets.data(), b.prev_rows.data(), ys, arena);
  });
  return ys;
}

// Tokens of 4 packed sequences (lengths 3, 2, 4, 1).
const std::vector<Index> k_sequence = {0, 0, 0, 1, 1, 2, 2, 2, 2, 3};

template <class T>
void check_forward(const std::vector<Index>& expert, Index n_experts, double bound) {
  GRU<T> bank({.d_model = 13, .d_ff = 1, .n_experts = n_experts, .top_k = 1});
  moe::Rng rng(23);
  bank.init(rng);
  const Batch b = make_batch(k_sequence, expert, n_experts);
  const RowMatrix<T> xs = moe::test::normal_matrix<T>(rng, Index(expert.size()), 13);
  const RowMatrix<T> ys = gru_forward(bank, xs, b);
  const RowMatrix<double> ref = naive_gru(bank, xs, b);
  CHECK(moe::test::nmse(ref.data(), ys.data(), std::size_t(ref.size())) <= bound);
}

}  // namespace

TEST_CASE("carried_state_rows links each sequence's tokens on one expert, in order", "[expert]") {
  // Token-level routing: sequence 0 = tokens 0, 1, 2 on experts 0, 1, 0; sequence 2 = tokens 5..8 on 1, 1, 0, 1.
  const Batch b = make_batch(k_sequence, {0, 1, 0, 0, 0, 1, 1, 0, 1, 1}, 2);
  // Expert 0 rows: tokens 0, 2, 3, 4, 7; expert 1 rows: tokens 1, 5, 6, 8, 9.
  REQUIRE(b.prev_rows == std::vector<Index>{-1, 0, -1, 2, -1, -1, -1, 6, 7, -1});
}

TEST_CASE("GRU bank matches a naive GRU walking the tokens in time order", "[expert]") {
  // Token-level routing with carried state (3 experts, one without tokens).
  const std::vector<Index> token_level = {0, 2, 0, 0, 0, 2, 2, 0, 2, 2};
  check_forward<float>(token_level, 3, 1e-7);
  check_forward<double>(token_level, 3, 1e-24);
  // Sequence-level routing (Hecto): every token of a sequence on the sequence's expert.
  const std::vector<Index> sequence_level = {1, 1, 1, 0, 0, 1, 1, 1, 1, 0};
  check_forward<float>(sequence_level, 2, 1e-7);
  check_forward<double>(sequence_level, 2, 1e-24);
}

TEST_CASE("GRU bank as a plain ExpertBank runs every row from a zero state", "[expert]") {
  GRU<double> bank({.d_model = 6, .d_ff = 1, .n_experts = 2, .top_k = 1});
  moe::Rng rng(4);
  bank.init(rng);
  const RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, 5, 6);
  const RowMatrix<double> ys = moe::test::bank_forward(bank, xs, {0, 2, 5});
  // Same as the chained forward with every prev_rows entry -1: one-token sequences.
  Batch b = make_batch({0, 1, 2, 3, 4}, {0, 0, 1, 1, 1}, 2);
  REQUIRE(b.prev_rows == std::vector<Index>(5, -1));
  CHECK(moe::test::nmse(naive_gru(bank, xs, b).data(), ys.data(), 30) <= 1e-24);
}

TEST_CASE("GRU bank backpropagates through time (central finite differences in double)", "[expert][grad]") {
  for (const auto& expert : {std::vector<Index>{0, 2, 0, 0, 0, 2, 2, 0, 2, 2}, std::vector<Index>{1, 1, 1, 0, 0, 1, 1, 1, 1, 0}}) {
    GRU<double> bank({.d_model = 5, .d_ff = 1, .n_experts = 3, .top_k = 1});
    moe::Rng rng(29);
    bank.init(rng);
    const Batch b = make_batch(k_sequence, expert, 3);
    RowMatrix<double> xs = moe::test::normal_matrix<double>(rng, 10, 5);
    const double biggest = moe::test::check_bank_gradients(
        bank, xs, 5,
        [&](moe::MatrixView<double> ys, moe::Arena& arena) {
          bank.forward(xs, b.offsets.data(), b.prev_rows.data(), ys, arena);
        },
        [&](moe::ConstMatrixView<double> dys, moe::MatrixView<double> dxs, moe::Arena& arena) {
          bank.backward(xs, b.offsets.data(), b.prev_rows.data(), dys, dxs, arena);
        });
    REQUIRE(biggest > 1e-3);
  }
}

TEST_CASE("GRU bank: an expert without rows keeps exactly zero gradients over a NaN-poisoned workspace",
          "[expert][grad]") {
  GRU<float> bank({.d_model = 8, .d_ff = 1, .n_experts = 3, .top_k = 1});
  moe::Rng rng(3);
  bank.init(rng);
  const Batch b = make_batch(k_sequence, {0, 0, 0, 2, 2, 0, 0, 2, 2, 2}, 3);
  const RowMatrix<float> xs = moe::test::normal_matrix<float>(rng, 10, 8);
  const RowMatrix<float> dys = moe::test::normal_matrix<float>(rng, 10, 8);
  RowMatrix<float> dxs(10, 8);
  moe::test::check_empty_expert_gradient(bank, 3, 1, [&](moe::Arena& arena) {
    bank.backward(xs, b.offsets.data(), b.prev_rows.data(), dys, dxs, arena);
  });
  REQUIRE(dxs.allFinite());
}

TEST_CASE("GRU bank rejects a prev_rows entry outside its expert before writing anything", "[expert]") {
  GRU<float> bank({.d_model = 4, .d_ff = 1, .n_experts = 2, .top_k = 1});
  const std::vector<Index> offsets = {0, 2, 4};
  const RowMatrix<float> xs = RowMatrix<float>::Ones(4, 4);
  RowMatrix<float> ys = RowMatrix<float>::Constant(4, 4, 7.0f);
  moe::Workspace ws(1 << 16);
  for (const auto& prev : {std::vector<Index>{-1, 0, 1, 2}, std::vector<Index>{-1, 1, -1, 2}}) {
    moe::Arena arena(ws);
    REQUIRE_THROWS_WITH(bank.forward(xs, offsets.data(), prev.data(), ys, arena),
                        Catch::Contains("prev_rows[") && Catch::Contains("earlier row of expert"));
    REQUIRE((ys.array() == 7.0f).all());
  }
}
