// RELIABILITY F3: fuzz dispatch and combine with arbitrary assignments (RELIABILITY I2).
//
// Bytes -> n_tokens <= 64, n_experts <= 64, top_k <= 16 and an assignment (n_tokens, top_k) of expert ids:
// valid ids, duplicates within a token, -1 and other negatives (unused), ids >= n_experts and huge ones
// (out of range); power-of-two weights (±2^-j, 0), so every sum below is exact in f32.
//
// 1. RoutingPlan::build (routing_plan.hpp) on the assignment, over a NaN/-1-poisoned workspace: it throws
//    moe::Error exactly when some id >= n_experts; otherwise every (token, slot) with id >= 0 has exactly one
//    grouped row, inside its expert's range, whose row_token is its token, rows ordered by (expert, token,
//    slot); the others have slot_row -1; counts[e] = slots on e; Σ_e n_e = offsets[E] = T·k − unused.
//    Then the combine (kernels::scatter_add for the native arch and for kernels::scalar, and the reference
//    one) over marker rows: the row of expert e is the one-hot e_e with its token index in the last column,
//    so out[t] must be exactly Σ_s w_s e_{id_s} + (t Σ_s w_s) e_last.
// 2. The path users reach: MoELayer with a router that returns the assignment (optionally capacity-limited,
//    then with distinct ids per token, as routers guarantee) and marker expert banks (one or two, so the
//    per-bank offsets are exercised; reading gathered rows or, token-indexed, the tokens through the plan's
//    row_token): inference and training forwards throw moe::Error exactly when an id is out of range, else
//    y is exactly the marker sum of the kept slots, the banks saw each kept (token, expert) pair exactly
//    once, tokens_per_expert / experts_per_token / dropped_slots agree with the ids, and the capacity drops
//    are the documented ones. Backward: dx = (Σ_kept w_s dy_last) e_last exactly, and the router receives
//    dL/dw[t, s] = dy[t, id] + t dy[t, last] for kept slots, 0 for dropped ones.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <moe/kernels/reference/scatter_add.hpp>
#include <moe/moe.hpp>

#include "fuzz_support.hpp"

namespace {

using moe::Index;
using moe::fuzz::ByteReader;
using Matrix = moe::RowMatrix<float>;

constexpr Index k_max_tokens = 64;
constexpr Index k_max_experts = 64;
constexpr Index k_max_top_k = 16;

struct Assignment {
  Index T = 0, E = 1, k = 1;
  std::vector<Index> ids;  // (T, k)
  std::vector<float> w;    // (T, k)
  bool out_of_range() const {
    return std::any_of(ids.begin(), ids.end(), [&](Index e) { return e >= E; });
  }
};

Index read_id(ByteReader& in, Index E, const Index* token_ids, Index s) {
  const std::uint8_t c = in.byte();
  if (c < 150) return in.below(E);                                  // valid
  if (c < 180 && s > 0) return token_ids[in.below(s)];                // a duplicate within the token
  if (c < 200) return -1;                                           // unused
  if (c < 210) return -1 - in.below(1000);                          // other negatives
  if (c < 215) return std::numeric_limits<Index>::min();
  if (c < 235) return E + in.below(3);                              // just out of range
  if (c < 240) return std::numeric_limits<Index>::max();
  return in.below(E);
}

// ±2^-j for j in [0, 10], or 0: products with token indices and sums of k of them stay exact in f32.
float read_weight(ByteReader& in) {
  const std::uint8_t c = in.byte();
  if (c < 8) return 0.0f;
  const float w = std::ldexp(1.0f, -static_cast<int>(c % 11));
  return c >= 224 ? -w : w;
}

// The marker sum of token t over the slots in `ids` (n_cols = E + 1): exact in double and in f32.
std::vector<double> marker_sum(const Assignment& a, const std::vector<Index>& ids, const std::vector<float>& w, Index t) {
  std::vector<double> out(static_cast<std::size_t>(a.E + 1), 0.0);
  for (Index s = 0; s < a.k; ++s) {
    const auto i = static_cast<std::size_t>(t * a.k + s);
    if (ids[i] < 0) continue;
    out[static_cast<std::size_t>(ids[i])] += double(w[i]);
    out[static_cast<std::size_t>(a.E)] += double(t) * double(w[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Part 1: the plan and the combine kernels.

void check_plan(const Assignment& a, ByteReader& in) {
  const Index T = a.T, k = a.k, E = a.E, n_slots = T * k;
  moe::Arena measure;
  moe::RoutingPlan::carve(measure, T, k, E);
  moe::Workspace ws(std::max<std::size_t>(measure.peak(), 64));
  std::fill_n(reinterpret_cast<unsigned char*>(ws.data()), ws.capacity(), 0xA5);  // poison
  moe::Arena arena(ws);
  moe::RoutingPlan plan = moe::RoutingPlan::carve(arena, T, k, E);
  bool threw = false;
  try {
    plan.build(a.ids.data());
  } catch (const moe::Error&) {
    threw = true;
  }
  MOE_FUZZ_CHECK(threw == a.out_of_range(), "RoutingPlan::build " << (threw ? "rejected" : "accepted")
                                                                  << " an assignment with out_of_range = " << a.out_of_range());
  if (threw) return;

  Index kept = 0;
  for (Index e = 0; e < E; ++e) {
    const Index n_e = std::count(a.ids.begin(), a.ids.end(), e);
    MOE_FUZZ_CHECK(plan.counts[e] == n_e, "RoutingPlan: counts[" << e << "] = " << plan.counts[e] << ", expected " << n_e);
    MOE_FUZZ_CHECK(plan.offsets[e + 1] - plan.offsets[e] == n_e, "RoutingPlan: offsets of expert " << e);
    kept += n_e;
  }
  const Index unused = std::count_if(a.ids.begin(), a.ids.end(), [](Index e) { return e < 0; });
  MOE_FUZZ_CHECK(plan.offsets[0] == 0 && plan.n_rows() == kept && kept == n_slots - unused,
                 "RoutingPlan: Σ n_e = " << plan.n_rows() << ", expected T·k − unused = " << n_slots - unused);
  // Each kept (token, slot) owns exactly one row, in its expert's range, rows in (expert, token, slot) order.
  std::vector<Index> owner(static_cast<std::size_t>(kept), -1);
  std::vector<Index> last_row(static_cast<std::size_t>(E), -1);
  for (Index i = 0; i < n_slots; ++i) {
    const Index e = a.ids[static_cast<std::size_t>(i)], r = plan.slot_row[i];
    if (e < 0) {
      MOE_FUZZ_CHECK(r == -1, "RoutingPlan: unused slot " << i << " has row " << r);
      continue;
    }
    MOE_FUZZ_CHECK(r >= plan.offsets[e] && r < plan.offsets[e + 1],
                   "RoutingPlan: slot " << i << " of expert " << e << " has row " << r << " outside ["
                                        << plan.offsets[e] << ", " << plan.offsets[e + 1] << ")");
    MOE_FUZZ_CHECK(owner[static_cast<std::size_t>(r)] == -1,
                   "RoutingPlan: row " << r << " holds slots " << owner[static_cast<std::size_t>(r)] << " and " << i);
    owner[static_cast<std::size_t>(r)] = i;
    MOE_FUZZ_CHECK(plan.row_token[r] == i / k, "RoutingPlan: row " << r << " token " << plan.row_token[r] << ", expected " << i / k);
    MOE_FUZZ_CHECK(r > last_row[static_cast<std::size_t>(e)], "RoutingPlan: rows of expert " << e << " out of slot order");
    last_row[static_cast<std::size_t>(e)] = r;
  }

  // Marker rows: row r of expert e is e_e with its token in the last column.
  const Index cols = E + 1;
  Matrix src = Matrix::Zero(std::max<Index>(kept, 1), cols);
  for (Index e = 0; e < E; ++e)
    for (Index r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      src(r, e) = 1.0f;
      src(r, E) = static_cast<float>(plan.row_token[r]);
    }
  const moe::ConstMatrixView<float> src_view(src.data(), kept, cols);
  // `out` starts from a token-dependent offset (the combine adds to it), exact in f32.
  const float base = static_cast<float>(in.below(5)) - 2.0f;
  auto combine = [&](auto&& kernel) {
    Matrix out = Matrix::Constant(std::max<Index>(T, 1), cols, base);
    kernel(moe::MatrixView<float>(out.data(), T, cols));
    return out;
  };
  const Matrix native = combine([&](moe::MatrixView<float> out) {
    moe::kernels::scatter_add(moe::kernels::default_arch{}, out, src_view, plan.slot_row, a.w.data(), k);
  });
  const Matrix scalar = combine([&](moe::MatrixView<float> out) {
    moe::kernels::scatter_add(moe::kernels::scalar{}, out, src_view, plan.slot_row, a.w.data(), k);
  });
  const Matrix reference = combine([&](moe::MatrixView<float> out) {
    moe::kernels::reference::scatter_add(out, src_view, plan.slot_row, a.w.data(), k);
  });
  for (Index t = 0; t < T; ++t) {
    const std::vector<double> want = marker_sum(a, a.ids, a.w, t);
    for (Index j = 0; j < cols; ++j) {
      const double expected = double(base) + want[static_cast<std::size_t>(j)];
      MOE_FUZZ_CHECK(double(native(t, j)) == expected && double(scalar(t, j)) == expected && double(reference(t, j)) == expected,
                     "scatter_add: out(" << t << ", " << j << ") native " << native(t, j) << ", scalar " << scalar(t, j)
                                         << ", reference " << reference(t, j) << ", expected " << expected);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Part 2: MoELayer with a scripted router and marker banks.

// Returns the assignment as its choice (tokens beyond it: none); records the weight gradients it receives.
class ScriptedRouter {
 public:
  using Scalar = float;
  ScriptedRouter(Index d_model, const Assignment* a, std::vector<float>* dweights)
      : d_model_(d_model), a_(a), dweights_(dweights) {}
  Index d_model() const { return d_model_; }
  Index n_experts() const { return a_->E; }
  Index top_k() const { return a_->k; }
  using Saved = moe::NothingSaved;
  Saved carve_saved(moe::Arena&, Index) const { return {}; }
  void init(moe::Rng&) {}
  template <class F>
  void visit_parameters(F&&) {}
  template <class F>
  void visit_state(F&&) {}
  void route(const moe::RouteInput<float>& in, moe::RouteOutput<float, Saved>& out, moe::Arena& arena) const {
    if (arena.measuring() || in.n_tokens() == 0) return;
    MOE_FUZZ_CHECK(in.n_tokens() == a_->T, "ScriptedRouter: routed " << in.n_tokens() << " tokens, scripted " << a_->T);
    std::copy(a_->ids.begin(), a_->ids.end(), out.ids);
    std::copy(a_->w.begin(), a_->w.end(), out.weights);
  }
  void route_backward(const moe::RouteInput<float>& in, const moe::RouteOutput<float, Saved>&,
                      const moe::RouteGradient<float>& grad, moe::Arena& arena) {
    if (arena.measuring() || in.n_tokens() == 0) return;
    dweights_->assign(grad.dweights, grad.dweights + in.n_tokens() * a_->k);
  }

 private:
  Index d_model_;
  const Assignment* a_;
  std::vector<float>* dweights_;
};

// Expert `first + e` writes the one-hot e_{first+e} and copies the last column (the token index) of its row;
// records (expert, token) for every row it runs. Backward: the last column passes its gradient through.
// TokenIndexed: also reads its rows straight from the tokens (moe::TokenIndexedBank), so an inference forward
// of a layer of such banks takes the plan's row_token instead of a gathered copy.
template <bool TokenIndexed>
class MarkerBank {
 public:
  using Scalar = float;
  MarkerBank(Index first, Index n, Index d_model, std::vector<std::pair<Index, Index>>* seen)
      : first_(first), n_(n), d_(d_model), seen_(seen) {}
  Index d_model() const { return d_; }
  Index n_experts() const { return n_; }
  void init(moe::Rng&) {}
  template <class F>
  void visit_parameters(F&&) {}
  template <class F>
  void visit_state(F&&) {}
  void forward(moe::ConstMatrixView<float> xs, const Index* offsets, moe::MatrixView<float> ys, moe::Arena& arena) const {
    if (arena.measuring()) return;
    run(offsets, ys, [&](Index r) { return xs(r, d_ - 1); });
  }
  void forward_tokens(moe::ConstMatrixView<float> x, const Index* row_token, const Index* offsets,
                      moe::MatrixView<float> ys, moe::Arena& arena) const
    requires TokenIndexed
  {
    if (arena.measuring()) return;
    run(offsets, ys, [&](Index r) {
      MOE_FUZZ_CHECK(row_token[r] >= 0 && row_token[r] < x.rows(), "MarkerBank: row " << r << " token " << row_token[r]);
      return x(row_token[r], d_ - 1);
    });
  }
  template <class Marker>
  void run(const Index* offsets, moe::MatrixView<float> ys, Marker&& marker) const {
    for (Index e = 0; e < n_; ++e) {
      MOE_FUZZ_CHECK(offsets[e] <= offsets[e + 1] && offsets[e + 1] <= ys.rows(),
                     "MarkerBank: expert " << first_ + e << " rows [" << offsets[e] << ", " << offsets[e + 1] << ") of " << ys.rows());
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
        std::fill_n(ys.row(r), d_, 0.0f);
        ys(r, first_ + e) = 1.0f;
        ys(r, d_ - 1) = marker(r);
        seen_->emplace_back(first_ + e, static_cast<Index>(ys(r, d_ - 1)));
      }
    }
  }
  void backward(moe::ConstMatrixView<float>, const Index* offsets, moe::ConstMatrixView<float> dys,
                moe::MatrixView<float> dxs, moe::Arena& arena) {
    if (arena.measuring()) return;
    for (Index r = offsets[0]; r < offsets[n_]; ++r) {
      std::fill_n(dxs.row(r), d_, 0.0f);
      dxs(r, d_ - 1) = dys(r, d_ - 1);
    }
  }

 private:
  Index first_, n_, d_;
  std::vector<std::pair<Index, Index>>* seen_;
};

// The ids after CapacityLimited's documented drops (C = ceil(T·k / E · factor); per expert the slots in token
// order, or by descending weight with ties to the lower token; the first C stay).
std::vector<Index> capacity_drops(const Assignment& a, const moe::routers::CapacityOptions& o) {
  const Index cap = static_cast<Index>(
      std::ceil(static_cast<double>(a.T * a.k) / static_cast<double>(a.E) * o.capacity_factor));
  std::vector<Index> ids = a.ids;
  for (Index e = 0; e < a.E; ++e) {
    std::vector<Index> slots;
    for (Index i = 0; i < a.T * a.k; ++i)
      if (a.ids[static_cast<std::size_t>(i)] == e) slots.push_back(i);
    if (o.drop_policy == moe::routers::DropPolicy::probability)
      std::stable_sort(slots.begin(), slots.end(), [&](Index x, Index y) {
        return a.w[static_cast<std::size_t>(x)] > a.w[static_cast<std::size_t>(y)];
      });
    for (std::size_t j = static_cast<std::size_t>(std::max<Index>(cap, 0)); j < slots.size(); ++j)
      ids[static_cast<std::size_t>(slots[j])] = -1;
  }
  return ids;
}

template <class R, class... Banks>
void check_layer(moe::MoELayer<R, Banks...>& layer, const Assignment& a, const std::vector<Index>& kept_ids,
                 std::vector<std::pair<Index, Index>>& seen, const std::vector<float>& dweights, ByteReader& in) {
  const Index T = a.T, k = a.k, E = a.E, d = E + 1;
  Matrix x(T, d);
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < d - 1; ++j) x(t, j) = static_cast<float>(in.below(7)) - 3.0f;  // ignored by the markers
    x(t, d - 1) = static_cast<float>(t);
  }
  const bool reject = a.out_of_range() && T > 0;
  // Inference forward (token-indexed banks read the tokens in place): the same output as the training one.
  Matrix y_inference = Matrix::Constant(T, d, std::numeric_limits<float>::quiet_NaN());
  moe::Workspace ws;
  bool threw = false;
  try {
    layer.forward(x, y_inference, ws);
  } catch (const moe::Error&) {
    threw = true;
  }
  MOE_FUZZ_CHECK(threw == reject, "MoELayer::forward (inference) " << (threw ? "rejected" : "accepted")
                                                                   << " an assignment with out_of_range = " << a.out_of_range());

  Matrix y = Matrix::Constant(T, d, std::numeric_limits<float>::quiet_NaN());
  const Matrix y_before = y;
  moe::TrainingContext<float> ctx;
  moe::ForwardResult<float> res;
  threw = false;
  seen.clear();
  try {
    res = layer.forward(x, y, ctx);
  } catch (const moe::Error&) {
    threw = true;
  }
  MOE_FUZZ_CHECK(threw == reject, "MoELayer::forward " << (threw ? "rejected" : "accepted") << " an assignment with out_of_range = "
                                                        << a.out_of_range());
  if (threw) {
    // "Thrown before any output is written."
    MOE_FUZZ_CHECK(std::memcmp(y.data(), y_before.data(), sizeof(float) * static_cast<std::size_t>(y.size())) == 0,
                   "MoELayer::forward wrote y before throwing");
    return;
  }
  if (T == 0) return;

  // Routing result.
  Index dropped = 0;
  std::vector<Index> per_expert(static_cast<std::size_t>(E), 0);
  std::vector<std::pair<Index, Index>> expected_pairs;
  for (Index t = 0; t < T; ++t) {
    Index active = 0;
    for (Index s = 0; s < k; ++s) {
      const auto i = static_cast<std::size_t>(t * k + s);
      MOE_FUZZ_CHECK(res.expert_ids[i] == kept_ids[i],
                     "MoELayer: slot (" << t << ", " << s << ") id " << res.expert_ids[i] << ", expected " << kept_ids[i]);
      if (kept_ids[i] >= 0) {
        ++active;
        ++per_expert[static_cast<std::size_t>(kept_ids[i])];
        expected_pairs.emplace_back(kept_ids[i], t);
        MOE_FUZZ_CHECK(res.expert_weights[i] == a.w[i], "MoELayer: slot (" << t << ", " << s << ") weight changed");
      } else if (a.ids[i] >= 0) {
        ++dropped;
        MOE_FUZZ_CHECK(res.expert_weights[i] == 0.0f, "MoELayer: dropped slot (" << t << ", " << s << ") weighs " << res.expert_weights[i]);
      }
    }
    MOE_FUZZ_CHECK(res.experts_per_token[static_cast<std::size_t>(t)] == active, "MoELayer: experts_per_token[" << t << "]");
  }
  for (Index e = 0; e < E; ++e)
    MOE_FUZZ_CHECK(res.tokens_per_expert[static_cast<std::size_t>(e)] == per_expert[static_cast<std::size_t>(e)],
                   "MoELayer: tokens_per_expert[" << e << "] = " << res.tokens_per_expert[static_cast<std::size_t>(e)]
                                                  << ", expected " << per_expert[static_cast<std::size_t>(e)]);
  MOE_FUZZ_CHECK(res.dropped_slots == dropped, "MoELayer: dropped_slots = " << res.dropped_slots << ", expected " << dropped);
  // Every kept (token, slot) ran exactly once, on its expert.
  std::sort(seen.begin(), seen.end());
  std::sort(expected_pairs.begin(), expected_pairs.end());
  MOE_FUZZ_CHECK(seen == expected_pairs, "MoELayer: the banks ran " << seen.size() << " (expert, token) rows, expected "
                                                                    << expected_pairs.size() << " (or other pairs)");
  // Combined output: exactly the marker sum of the kept slots, in both forwards.
  for (Index t = 0; t < T; ++t) {
    const std::vector<double> want = marker_sum(a, kept_ids, a.w, t);
    for (Index j = 0; j < d; ++j)
      MOE_FUZZ_CHECK(double(y(t, j)) == want[static_cast<std::size_t>(j)] && double(y_inference(t, j)) == want[static_cast<std::size_t>(j)],
                     "MoELayer: y(" << t << ", " << j << ") = " << y(t, j) << " (inference " << y_inference(t, j)
                                    << "), expected " << want[static_cast<std::size_t>(j)]);
  }

  // Backward with power-of-two dy: dx = (Σ_kept w dy_last) e_last; the router gets dy[t, id] + t dy[t, last].
  Matrix dy(T, d), dx = Matrix::Constant(T, d, std::numeric_limits<float>::quiet_NaN());
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = std::ldexp(1.0f, -static_cast<int>(in.below(4))) * (in.flag() ? 1.0f : -1.0f);
  layer.backward(dy, dx, ctx);
  for (Index t = 0; t < T; ++t) {
    double last = 0;
    for (Index s = 0; s < k; ++s) {
      const auto i = static_cast<std::size_t>(t * k + s);
      const Index e = kept_ids[i];
      if (e >= 0) last += double(a.w[i]) * double(dy(t, d - 1));
      const double want_dw = e >= 0 ? double(dy(t, e)) + double(t) * double(dy(t, d - 1)) : 0.0;
      MOE_FUZZ_CHECK(double(dweights[i]) == want_dw,
                     "MoELayer::backward: dL/dw(" << t << ", " << s << ") = " << dweights[i] << ", expected " << want_dw);
    }
    for (Index j = 0; j < d; ++j) {
      const double want = j == d - 1 ? last : 0.0;
      MOE_FUZZ_CHECK(double(dx(t, j)) == want, "MoELayer::backward: dx(" << t << ", " << j << ") = " << dx(t, j) << ", expected " << want);
    }
  }
}

// One bank, or two banks splitting the experts at `split`; token-indexed banks or gathered rows.
template <class R>
void run_layer(R router, const Assignment& a, const std::vector<Index>& kept_ids, std::vector<std::pair<Index, Index>>& seen,
               const std::vector<float>& dweights, Index split, bool token_indexed, ByteReader& in) {
  const Index d = a.E + 1;
  const auto build = [&]<bool TI>(std::bool_constant<TI>) {
    using B = MarkerBank<TI>;
    if (split > 0) {
      moe::MoELayer<R, B, B> layer(std::move(router), B(0, split, d, &seen), B(split, a.E - split, d, &seen));
      check_layer(layer, a, kept_ids, seen, dweights, in);
    } else {
      moe::MoELayer<R, B> layer(std::move(router), B(0, a.E, d, &seen));
      check_layer(layer, a, kept_ids, seen, dweights, in);
    }
  };
  if (token_indexed) {
    build(std::true_type{});
  } else {
    build(std::false_type{});
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  Assignment a;
  a.T = in.below(k_max_tokens + 1);
  a.E = 1 + in.below(k_max_experts);
  a.k = 1 + in.below(k_max_top_k);
  const std::uint8_t mode = in.byte();
  const bool capacity = (mode & 1) != 0;
  const bool token_indexed = (mode & 4) != 0;
  const Index split = a.E >= 2 && (mode & 2) != 0 ? 1 + in.below(a.E - 1) : 0;
  a.ids.resize(static_cast<std::size_t>(a.T * a.k));
  a.w.resize(a.ids.size());
  for (Index t = 0; t < a.T; ++t)
    for (Index s = 0; s < a.k; ++s) {
      const auto i = static_cast<std::size_t>(t * a.k + s);
      a.ids[i] = read_id(in, a.E, a.ids.data() + t * a.k, s);
      a.w[i] = read_weight(in);
    }
  if (capacity) {
    // Routers give distinct ids per token (the Router concept); CapacityLimited relies on it.
    for (Index t = 0; t < a.T; ++t)
      for (Index s = 1; s < a.k; ++s) {
        Index* id = a.ids.data() + t * a.k;
        if (id[s] >= 0 && std::find(id, id + s, id[s]) != id + s) id[s] = -1;
      }
  }

  check_plan(a, in);

  std::vector<std::pair<Index, Index>> seen;
  std::vector<float> dweights;
  ScriptedRouter router(a.E + 1, &a, &dweights);
  if (capacity) {
    static constexpr double k_factor[] = {1.0, 1.25, 2.0, 0.5, 0.1, 1e-9, 1e9};
    const moe::routers::CapacityOptions o{.capacity_factor = in.pick(k_factor),
                                          .drop_policy = static_cast<moe::routers::DropPolicy>(in.below(2))};
    const std::vector<Index> kept = a.out_of_range() ? a.ids : capacity_drops(a, o);
    run_layer(moe::routers::CapacityLimited<ScriptedRouter>(router, o), a, kept, seen, dweights, split, token_indexed, in);
  } else {
    run_layer(router, a, a.ids, seen, dweights, split, token_indexed, in);
  }
  return 0;
}
