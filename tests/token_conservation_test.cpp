// RELIABILITY.md I2, token conservation through the real layer (route -> plan -> grouped rows -> banks ->
// combine), with capacity limits from none down to 1 slot per expert:
//  - marker experts (expert e writes the one-hot row e_e) behind a real top-k softmax router: every kept
//    (token, slot) reaches its expert exactly once with its own token's row, the combined output is exactly
//    the selected set (y[t][e] == the weight of the slot holding e, bitwise, 0 elsewhere), and
//    sum_e n_e = T k - dropped;
//  - copy experts on x_t = integers with slot weights 2^-(s+1): the output is x_t * sum over the kept slots
//    of 2^-(s+1), exact, whose binary digits name the slots that were combined, each once.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

using moe::Index;
using moe::RowMatrix;
using moe::routers::CapacityLimited;
using moe::routers::DropPolicy;

namespace {

// Expert e writes the one-hot row e_e whatever its input, and logs (token, e) for each of its rows, the
// token found by the row's bits among the batch's tokens (-1 if the row is no token's).
class MarkerBank {
 public:
  using Scalar = float;
  MarkerBank(Index n_experts, const RowMatrix<float>* tokens, std::vector<std::pair<Index, Index>>* log)
      : n_experts_(n_experts), tokens_(tokens), log_(log) {}
  Index d_model() const { return tokens_->cols(); }
  Index n_experts() const { return n_experts_; }
  void init(moe::Rng&) {}
  void forward(moe::ConstMatrixView<float> xs, const Index* offsets, moe::MatrixView<float> ys, moe::Arena& arena) const {
    if (arena.measuring()) return;
    for (Index e = 0; e < n_experts_; ++e) {
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
        std::fill_n(ys.row(r), ys.cols(), 0.0f);
        ys(r, e) = 1.0f;
        log_->emplace_back(token_of(xs.row(r)), e);
      }
    }
  }

 private:
  Index token_of(const float* row) const {
    for (Index t = 0; t < tokens_->rows(); ++t)
      if (std::memcmp(tokens_->row(t).data(), row, sizeof(float) * static_cast<std::size_t>(tokens_->cols())) == 0) return t;
    return -1;
  }
  Index n_experts_;
  const RowMatrix<float>* tokens_;
  std::vector<std::pair<Index, Index>>* log_;
};

// A router with a fixed table: token t's slot s goes to expert table[t k + s] with weight 2^-(s+1).
class TableRouter {
 public:
  using Scalar = float;
  TableRouter(Index d_model, Index n_experts, Index top_k, std::vector<Index> table)
      : d_model_(d_model), n_experts_(n_experts), top_k_(top_k), table_(std::move(table)) {}
  Index d_model() const { return d_model_; }
  Index n_experts() const { return n_experts_; }
  Index top_k() const { return top_k_; }
  using Saved = moe::NothingSaved;
  Saved carve_saved(moe::Arena&, Index) const { return {}; }
  void init(moe::Rng&) {}
  void route(const moe::RouteInput<float>& in, moe::RouteOutput<float, Saved>& out, moe::Arena& arena) const {
    if (arena.measuring()) return;
    for (Index i = 0; i < in.n_tokens() * top_k_; ++i) {
      out.ids[i] = table_[static_cast<std::size_t>(i)];
      out.weights[i] = std::ldexp(1.0f, -static_cast<int>(i % top_k_ + 1));
    }
  }

 private:
  Index d_model_, n_experts_, top_k_;
  std::vector<Index> table_;
};

struct Capacity {
  double factor;
  DropPolicy policy;
};
// From no limit down to one slot per expert (factor 1e-9: C = ceil(tiny) = 1), both drop policies.
const std::vector<Capacity> k_capacities = {{1e9, DropPolicy::probability}, {2.0, DropPolicy::probability},
                                            {1.0, DropPolicy::position},     {0.5, DropPolicy::probability},
                                            {0.5, DropPolicy::position},     {1e-9, DropPolicy::probability},
                                            {1e-9, DropPolicy::position}};

// The (token, expert) pairs the routing asks for, sorted; and the dropped slots.
std::vector<std::pair<Index, Index>> kept_pairs(const moe::ForwardResult<float>& res, Index& dropped) {
  std::vector<std::pair<Index, Index>> pairs;
  dropped = 0;
  for (Index t = 0; t < res.n_tokens; ++t)
    for (Index s = 0; s < res.top_k; ++s) {
      const Index e = res.expert_ids[static_cast<std::size_t>(t * res.top_k + s)];
      if (e >= 0) pairs.emplace_back(t, e);
      else ++dropped;
    }
  std::sort(pairs.begin(), pairs.end());
  return pairs;
}

// Checks shared by both setups; returns the number of experts that received a slot.
Index check_counts(const moe::ForwardResult<float>& res, Index n_experts, Index capacity) {
  const Index T = res.n_tokens, k = res.top_k;
  Index dropped = 0;
  const auto pairs = kept_pairs(res, dropped);
  REQUIRE(std::adjacent_find(pairs.begin(), pairs.end()) == pairs.end());  // a token holds an expert once
  for (const auto& [t, e] : pairs) REQUIRE(e < n_experts);
  REQUIRE(res.dropped_slots == dropped);
  Index total = 0, used = 0;
  for (Index e = 0; e < n_experts; ++e) {
    const Index n = res.tokens_per_expert[static_cast<std::size_t>(e)];
    REQUIRE(n <= capacity);
    total += n;
    used += n > 0 ? 1 : 0;
  }
  REQUIRE(total == T * k - res.dropped_slots);  // sum_e n_e = T k - dropped
  for (Index t = 0; t < T; ++t) {
    Index active = 0;
    for (Index s = 0; s < k; ++s) active += res.expert_ids[static_cast<std::size_t>(t * k + s)] >= 0 ? 1 : 0;
    REQUIRE(res.experts_per_token[static_cast<std::size_t>(t)] == active);
  }
  return used;
}

}  // namespace

TEST_CASE("I2: marker experts through the layer: every kept slot exactly once, the output is the selected set",
          "[layer][conservation]") {
  const Index E = 8, d = 13, k = 3;
  using Router = CapacityLimited<moe::routers::TopKSoftmax<float>>;
  moe::routers::TopKSoftmax<float> inner({.d_model = d, .d_ff = 1, .n_experts = E, .top_k = k});
  moe::Rng init(3);
  inner.init(init);
  RowMatrix<float> tokens;
  std::vector<std::pair<Index, Index>> log;
  Index checked_slots = 0, total_dropped = 0;
  for (const Index T : {1, 2, 37, 64}) {
    moe::test::Rng rng(static_cast<std::uint64_t>(100 + T));
    tokens = moe::test::normal_matrix<float>(rng, T, d);
    for (const auto& cap : k_capacities) {
      INFO("T = " << T << ", capacity factor " << cap.factor << ", policy " << static_cast<int>(cap.policy));
      moe::MoELayer<Router, MarkerBank> layer(Router(inner, {.capacity_factor = cap.factor, .drop_policy = cap.policy}),
                                              MarkerBank(E, &tokens, &log));
      const Index C = layer.router().capacity(T);
      RowMatrix<float> y = RowMatrix<float>::Constant(T, d, -3.0f);
      moe::Workspace ws;
      log.clear();
      const auto res = layer.forward(tokens, y, ws);
      const Index used = check_counts(res, E, C);

      // Dispatch: the marker bank saw exactly the kept (token, expert) pairs, each once, each with its token's row.
      Index dropped = 0;
      const auto pairs = kept_pairs(res, dropped);
      std::sort(log.begin(), log.end());
      REQUIRE(log.size() == pairs.size());
      for (std::size_t i = 0; i < log.size(); ++i) {
        INFO("marker bank row " << i << ": token " << log[i].first << " on expert " << log[i].second
                                << ", the routing asks for token " << pairs[i].first << " on expert " << pairs[i].second);
        REQUIRE(log[i] == pairs[i]);
      }

      // Combine: y[t] = sum over kept slots of w e_id, exactly: the weight in the expert's column, 0 elsewhere.
      for (Index t = 0; t < T; ++t)
        for (Index j = 0; j < d; ++j) {
          float want = 0.0f;
          for (Index s = 0; s < k; ++s)
            if (res.expert_ids[static_cast<std::size_t>(t * k + s)] == j) want = res.expert_weights[static_cast<std::size_t>(t * k + s)];
          INFO("token " << t << ", column " << j << ": y " << y(t, j) << ", the selected set gives " << want);
          REQUIRE(std::memcmp(&y(t, j), &want, sizeof(float)) == 0);
        }

      // Not vacuous (RELIABILITY H4): without a limit most experts are used; a tight limit drops slots.
      if (cap.factor > 1e8) CHECK(2 * used >= std::min(E, T * k));
      if (cap.factor < 1 && T * k > E) CHECK(res.dropped_slots > 0);
      if (cap.factor < 1e-6) CHECK(C == 1);
      checked_slots += static_cast<Index>(pairs.size());
      total_dropped += res.dropped_slots;
    }
  }
  CHECK(checked_slots > 500);
  CHECK(total_dropped > 100);
}

TEST_CASE("I2: copy experts on integer tokens with power-of-two weights: y = x_t * (kept weights), exact",
          "[layer][conservation]") {
  const Index E = 6, d = 5, k = 4, T_max = 70;
  // A skewed table (low ids popular), distinct experts per token.
  moe::test::Rng rng(9);
  std::vector<Index> table;
  for (Index t = 0; t < T_max; ++t) {
    std::vector<Index> left = {0, 1, 2, 3, 4, 5};
    for (Index s = 0; s < k; ++s) {
      const Index n = static_cast<Index>(left.size());
      const Index pick = std::min(rng.below(n), rng.below(n));
      table.push_back(left[static_cast<std::size_t>(pick)]);
      left.erase(left.begin() + pick);
    }
  }
  using Router = CapacityLimited<TableRouter>;
  Index total_dropped = 0;
  for (const Index T : {Index{1}, Index{3}, Index{29}, T_max}) {
    // x[t][j] = (t + 1) + 256 j: distinct integers below 2^11, so x * (a sum of four powers of two) is exact.
    RowMatrix<float> x(T, d);
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < d; ++j) x(t, j) = static_cast<float>(t + 1 + 256 * j);
    for (const auto& cap : k_capacities) {
      INFO("T = " << T << ", capacity factor " << cap.factor << ", policy " << static_cast<int>(cap.policy));
      moe::MoELayer<Router, moe::experts::CopyExperts<float>> layer(
          Router(TableRouter(d, E, k, table), {.capacity_factor = cap.factor, .drop_policy = cap.policy}),
          moe::experts::CopyExperts<float>(E, d));
      const Index C = layer.router().capacity(T);
      RowMatrix<float> y = RowMatrix<float>::Constant(T, d, -3.0f);
      moe::Workspace ws;
      const auto res = layer.forward(x, y, ws);
      const Index used = check_counts(res, E, C);
      for (Index t = 0; t < T; ++t) {
        double kept = 0;  // sum of 2^-(s+1) over the slots the layer kept
        for (Index s = 0; s < k; ++s) {
          const auto slot = static_cast<std::size_t>(t * k + s);
          const Index e = res.expert_ids[slot];
          if (e < 0) {
            REQUIRE(res.expert_weights[slot] == 0.0f);
            continue;
          }
          REQUIRE(e == table[slot]);  // kept slots keep the router's choice and weight
          REQUIRE(res.expert_weights[slot] == std::ldexp(1.0f, -static_cast<int>(s + 1)));
          kept += std::ldexp(1.0, -static_cast<int>(s + 1));
        }
        for (Index j = 0; j < d; ++j) {
          const auto want = static_cast<float>(static_cast<double>(x(t, j)) * kept);
          INFO("token " << t << ", column " << j << ": y " << y(t, j) << ", x * kept weights " << want);
          REQUIRE(std::memcmp(&y(t, j), &want, sizeof(float)) == 0);
        }
      }
      if (cap.factor > 1e8) CHECK(2 * used >= std::min(E, T * k));
      if (cap.factor < 1 && T > 3) CHECK(res.dropped_slots > 0);
      total_dropped += res.dropped_slots;
    }
  }
  CHECK(total_dropped > 100);
}
