// RELIABILITY F2: fuzz every router of include/moe/routers/ (RELIABILITY I1, B3).
//
// Bytes -> a router kind with its options, a shape (n_tokens <= 64, n_experts <= 64, top_k <= n_experts,
// d_model <= 8), the gate weights and the tokens (special values included: NaN, ±inf, denormals, ±FLT_MAX,
// exp overflow points, exact ties), or the logits themselves (route_logits). The router runs directly and
// inside a MoELayer with copy experts. Oracle, for every token:
//  - ids in [0, n_experts), distinct, or -1 where the router documents unused or dropped slots;
//  - the selection is the documented one where it can be recomputed exactly from what the router saved
//    (top-k of the keys, ties to the lower id, NaN below -inf; groups; capacity drop policy; expert choice);
//  - weights never NaN; finite and in [0, scale] but for unnormalised sqrt-softplus (+inf allowed); a
//    renormalised row (and NullExpertRouter's true experts) sums to the scaling factor within (4k + 2)·u; all 0
//    only without a finite chosen logit (scores that underflow in f32 are renormalised in log space);
//    unnormalised probabilities sum to at most 1 + (E + k + 4)·u;
//  - a token's routing does not depend on another token's row (bitwise), for the token-independent routers;
//  - the layer: throws moe::Error exactly when x holds NaN or ±inf (and never otherwise), routes bitwise as the
//    router alone, tokens_per_expert and experts_per_token count the ids, dropped_slots counts the drops, and
//    y = (Σ kept weights)·x within γ_{k+1} (plus 2^-150 per subnormal rounding); a training forward routes
//    the same, and its backward (through whatever the forward saved) runs and accepts a finite dy.
// A violated oracle aborts with a message.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include <moe/moe.hpp>

#include "fuzz_support.hpp"

namespace {

using moe::Index;
using moe::fuzz::ByteReader;
using moe::fuzz::k_u32;
namespace routers = moe::routers;
using Matrix = moe::RowMatrix<float>;

constexpr Index k_max_tokens = 64;
constexpr Index k_max_experts = 64;
constexpr Index k_max_d_model = 8;

// ---------------------------------------------------------------------------------------------------------
// Running a router: outputs poisoned first (ids -7, values NaN), workspace sized by a measuring run and
// poisoned with NaN (RELIABILITY H3).

struct Routed {
  Index n_tokens = 0;
  Index slots = 0;
  std::vector<Index> ids;           // (n_tokens, slots)
  std::vector<float> w;             // (n_tokens, slots)
  std::vector<float> saved;         // the router's saved arrays the oracles read: (n_tokens, width) blocks in turn
  std::vector<Index> saved_widths;  // their widths
  Index dropped_slots = 0;          // the route's reports (0 when it reports none, as the layer sees them)
  std::array<double, moe::k_max_losses> losses{};
  Index n_losses = 0;
  const Index* id(Index t) const { return ids.data() + t * slots; }
  const float* weight(Index t) const { return w.data() + t * slots; }
};

// The saved arrays of a router as (pointer, width) blocks of n_tokens rows: what the oracles read. A wrapper
// gives its inner router's.
using Blocks = std::vector<std::pair<const float*, Index>>;
template <class R>
Blocks saved_blocks(const R&, const typename R::Saved&) {
  return {};
}
template <class A>
Blocks saved_blocks(const routers::TopKRouter<float, A>& r, const typename routers::TopKRouter<float, A>::Saved& s) {
  return {{s.scores, r.n_experts()}, {s.chosen_logits, s.chosen_logits == nullptr ? 0 : r.top_k()}};
}
template <class A>
Blocks saved_blocks(const routers::NullExpertRouter<float, A>& r,
                    const typename routers::NullExpertRouter<float, A>::Saved& s) {
  return {{s.probabilities, r.n_experts() + r.n_null_experts()}, {s.chosen_logits, r.top_k()}};
}
template <class A>
Blocks saved_blocks(const routers::DenseToSparseGate<float, A>& r,
                    const typename routers::DenseToSparseGate<float, A>::Saved& s) {
  return {{s.probabilities, r.n_experts()}};
}
template <class A>
Blocks saved_blocks(const routers::ExpertChoiceRouter<float, A>& r,
                    const typename routers::ExpertChoiceRouter<float, A>::Saved& s) {
  return {{s.scores, r.n_experts()}};
}
template <class R>
Blocks saved_blocks(const routers::SequenceLevel<R>& r, const typename R::Saved& s) {
  return saved_blocks(r.inner(), s);
}
template <class R>
Blocks saved_blocks(const routers::GatingResidual<R>& r, const typename R::Saved& s) {
  return saved_blocks(r.inner(), s);
}
template <class R, class... L>
Blocks saved_blocks(const routers::WithLosses<R, L...>& r, const typename routers::WithLosses<R, L...>::Saved& s) {
  return saved_blocks(r.inner(), s.inner);
}
template <class R>
Blocks saved_blocks(const routers::CapacityLimited<R>& r, const typename routers::CapacityLimited<R>::Saved& s) {
  return saved_blocks(r.inner(), s.inner);
}

// Runs call(arena, measuring, out) for a batch of n_tokens: ids and weights poisoned first (-7, NaN), the
// workspace (which holds the saved block) sized by a measuring run and poisoned with NaN (RELIABILITY H3).
template <class R, class Call>
Routed run_router(const R& router, Index n_tokens, Call&& call) {
  Routed r;
  r.n_tokens = n_tokens;
  r.slots = router.top_k();
  r.ids.assign(static_cast<std::size_t>(n_tokens * r.slots), -7);
  r.w.assign(static_cast<std::size_t>(n_tokens * r.slots), std::numeric_limits<float>::quiet_NaN());
  moe::Arena measure;
  moe::RouteOutputOf<R> sizing;
  sizing.saved = router.carve_saved(measure, n_tokens);
  call(measure, true, sizing);
  moe::Workspace ws(std::max<std::size_t>(measure.peak(), 64));
  std::fill_n(reinterpret_cast<unsigned char*>(ws.data()), ws.capacity(), 0xFF);
  moe::Arena arena(ws);
  moe::RouteOutputOf<R> out;
  out.ids = r.ids.data();
  out.weights = r.w.data();
  out.saved = router.carve_saved(arena, n_tokens);
  call(arena, false, out);
  MOE_FUZZ_CHECK(arena.peak() <= measure.peak(), "the router used " << arena.peak() << " bytes, measured " << measure.peak());
  for (const auto& [p, width] : saved_blocks(router, out.saved)) {
    r.saved.insert(r.saved.end(), p, p + n_tokens * width);
    r.saved_widths.push_back(width);
  }
  r.dropped_slots = out.dropped_slots;
  r.losses = out.losses;
  r.n_losses = out.n_losses;
  return r;
}

// route(in, out) with in.x = x (a shape-only view while measuring) and `in` otherwise from `input`.
template <class R>
Routed route_x(const R& router, moe::ConstMatrixView<float> x, moe::RouteInput<float> input = {}) {
  return run_router(router, x.rows(), [&](moe::Arena& a, bool measuring, moe::RouteOutputOf<R>& out) {
    input.x = measuring ? moe::ConstMatrixView<float>::shape_only(x.rows(), x.cols()) : x;
    router.route(input, out, a);
  });
}

// route_logits(z, out) of a router that chooses from given logits.
template <class R>
Routed route_from_logits(const R& router, moe::ConstMatrixView<float> z) {
  return run_router(router, z.rows(), [&](moe::Arena& a, bool measuring, moe::RouteOutputOf<R>& out) {
    router.route_logits(measuring ? moe::ConstMatrixView<float>::shape_only(z.rows(), z.cols()) : z, out, a);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Oracles shared by the routers.

// The documented order: the larger key first; NaN below everything (-inf too); -0 == +0; ties: lower id.
bool ranks_before(float a, Index ia, float b, Index ib) {
  const bool nan_a = std::isnan(a), nan_b = std::isnan(b);
  if (nan_a || nan_b) return nan_a && nan_b ? ia < ib : nan_b;
  if (a != b) return a > b;
  return ia < ib;
}

// The ids of the k first entries of keys[0, n) in the documented order (a brute-force reference).
std::vector<Index> reference_top_k(const float* keys, Index n, Index k) {
  std::vector<Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Index{0});
  std::sort(order.begin(), order.end(), [&](Index a, Index b) { return ranks_before(keys[a], a, keys[b], b); });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

// Ids in [0, n_experts), or -1 when unused slots are allowed; the ids >= 0 distinct.
void check_ids(const Index* id, Index k, Index n_experts, bool allow_unused, const char* who, Index t) {
  for (Index s = 0; s < k; ++s) {
    MOE_FUZZ_CHECK((id[s] >= 0 && id[s] < n_experts) || (allow_unused && id[s] == -1),
                   who << ": token " << t << " slot " << s << " has id " << id[s] << ", n_experts = " << n_experts);
    for (Index q = 0; q < s; ++q)
      MOE_FUZZ_CHECK(id[s] < 0 || id[q] != id[s], who << ": token " << t << " chose expert " << id[s] << " twice");
  }
}

enum class SumRule {
  normalized,     // Σw = scale within (4k + 2)u (or every weight 0 when `zero_ok`)
  probabilities,  // each in [0, scale], Σw <= scale (1 + (E + k + 4)u)
  each_unit,      // each in [0, scale]
  nonnegative     // >= 0, +inf allowed
};

void check_weights(const float* w, const Index* id, Index k, Index n_experts, SumRule rule, float scale, bool zero_ok,
                   const char* who, Index t) {
  double sum = 0;
  bool all_zero = true;
  for (Index s = 0; s < k; ++s) {
    MOE_FUZZ_CHECK(!std::isnan(w[s]), who << ": token " << t << " slot " << s << " has a NaN weight");
    if (id[s] < 0) MOE_FUZZ_CHECK(w[s] == 0.0f, who << ": token " << t << " slot " << s << " is unused but weighs " << w[s]);
    MOE_FUZZ_CHECK(w[s] >= 0.0f, who << ": token " << t << " slot " << s << " weight " << w[s] << " < 0");
    if (rule != SumRule::nonnegative)
      MOE_FUZZ_CHECK(std::isfinite(w[s]) && double(w[s]) <= double(scale) * (1.0 + 4.0 * k_u32),
                     who << ": token " << t << " slot " << s << " weight " << w[s] << " outside [0, " << scale << "]");
    sum += double(w[s]);
    all_zero = all_zero && w[s] == 0.0f;
  }
  if (rule == SumRule::normalized) {
    const double tol = (4.0 * double(k) + 2.0) * k_u32 * double(scale);
    MOE_FUZZ_CHECK(std::abs(sum - double(scale)) <= tol || (zero_ok && all_zero),
                   who << ": token " << t << " renormalised weights sum to " << sum << ", expected " << scale
                       << " within " << tol << (zero_ok ? " (or all 0)" : ""));
  } else if (rule == SumRule::probabilities) {
    const double bound = double(scale) * (1.0 + double(n_experts + k + 4) * k_u32);
    MOE_FUZZ_CHECK(sum <= bound, who << ": token " << t << " probabilities sum to " << sum << " > " << bound);
  }
}

// ---------------------------------------------------------------------------------------------------------
// TopKRouter (and everything wrapping it): options from bytes, and its documented choice recomputed.

struct TopKSetup {
  routers::TopKOptions options;
  bool training = false;
  std::uint64_t step = 0;
};

TopKSetup read_top_k_setup(ByteReader& in, Index n_experts) {
  static constexpr double k_scale[] = {1.0, 1.0, 1.0, 2.5, 16.0, 0.5, 1e-3, 1e30, 0.0};
  static constexpr double k_temperature[] = {1.0, 1.0, 1.0, 0.5, 2.0, 1e-3, 1e3, 1e-30, -1.0};
  static constexpr double k_jitter[] = {0.0, 0.0, 0.0, 0.01, 0.5, 0.999};
  TopKSetup s;
  auto& o = s.options;
  o.score = static_cast<routers::ScoreFunction>(in.below(3));
  const std::uint8_t flags = in.byte();
  o.softmax_after_top_k = (flags & 1) != 0 && o.score == routers::ScoreFunction::softmax;
  if ((flags & 0x80) != 0) o.softmax_after_top_k = (flags & 1) != 0;  // sometimes invalid: must throw
  o.renormalize = (flags & 2) != 0;
  o.selection_bias = (flags & 4) != 0;
  o.gumbel_noise = (flags & 8) != 0;
  s.training = (flags & 16) != 0;
  if ((flags & 32) != 0) {
    std::vector<Index> divisors;
    for (Index g = 1; g <= n_experts; ++g)
      if (n_experts % g == 0) divisors.push_back(g);
    o.n_groups = divisors[static_cast<std::size_t>(in.below(static_cast<std::int64_t>(divisors.size())))];
    o.top_k_groups = in.in(1, o.n_groups);
    o.group_score_top = in.in(1, n_experts / o.n_groups);
  }
  o.routed_scaling_factor = in.pick(k_scale);
  o.temperature = in.pick(k_temperature);
  o.jitter = in.pick(k_jitter);
  o.seed = in.byte();
  s.step = in.byte();
  return s;
}

void configure(routers::TopKRouter<float>& r, const TopKSetup& s) {
  r.set_training(s.training);
  r.set_step(s.step);
}

// The documented choice of TopKRouter from its saved row s (the scores, or with softmax_after_top_k the
// scaled logits with NaN read as -inf): keys = s (+ bias, NaN read as -inf), group limiting, top-k. nullopt
// when the keys cannot be recomputed (Gumbel noise in training).
bool top_k_reference(const routers::TopKRouter<float>& r, const float* s, std::vector<Index>& ids) {
  const auto& o = r.options();
  if (r.training() && o.gumbel_noise) return false;
  const Index E = r.n_experts();
  std::vector<float> key(s, s + E);
  const auto bias = r.bias();
  for (std::size_t e = 0; e < bias.size(); ++e) key[e] += bias[e];
  if (!bias.empty() || o.n_groups > 1)
    for (auto& v : key) v = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
  if (o.n_groups > 1) {
    const Index size = E / o.n_groups;
    std::vector<float> group_score(static_cast<std::size_t>(o.n_groups));
    for (Index g = 0; g < o.n_groups; ++g) {
      const auto best = reference_top_k(key.data() + g * size, size, o.group_score_top);
      float sum = 0;
      for (Index i : best) sum += key[static_cast<std::size_t>(g * size + i)];
      group_score[static_cast<std::size_t>(g)] = sum;
    }
    const auto kept = reference_top_k(group_score.data(), o.n_groups, o.top_k_groups);
    for (Index g = 0; g < o.n_groups; ++g)
      if (std::find(kept.begin(), kept.end(), g) == kept.end())
        std::fill_n(key.begin() + g * size, size, std::numeric_limits<float>::quiet_NaN());
  }
  ids = reference_top_k(key.data(), E, r.top_k());
  return true;
}

// I1 for one token of a TopKRouter: ids, the documented choice, the weights. `s` is the saved row.

// `finite_logits`: every (scaled) logit of the token is known to be finite; then the documented exception
// ("a row without a finite logit gets weight 0") does not apply and a renormalised row must sum to the scale.
// `chosen_logits` (top_k) is the saved block of the chosen logits when the router renormalises.
void check_top_k_token(const routers::TopKRouter<float>& r, const float* s, const float* chosen_logits, const Index* id,
                       const float* w, bool finite_logits, const char* who, Index t) {
  const auto& o = r.options();
  const Index E = r.n_experts(), k = r.top_k();
  check_ids(id, k, E, false, who, t);
  std::vector<Index> expected;
  if (top_k_reference(r, s, expected))
    for (Index j = 0; j < k; ++j)
      MOE_FUZZ_CHECK(id[j] == expected[static_cast<std::size_t>(j)],
                     who << ": token " << t << " slot " << j << " chose " << id[j] << ", the documented choice is "
                         << expected[static_cast<std::size_t>(j)]);
  if (o.n_groups > 1) {
    std::vector<Index> groups;
    for (Index j = 0; j < k; ++j) groups.push_back(id[j] / (E / o.n_groups));
    std::sort(groups.begin(), groups.end());
    const auto distinct = std::unique(groups.begin(), groups.end()) - groups.begin();
    MOE_FUZZ_CHECK(distinct <= o.top_k_groups, who << ": token " << t << " uses " << distinct << " groups > top_k_groups");
  }
  const float scale = static_cast<float>(o.routed_scaling_factor);
  if (o.softmax_after_top_k) {
    bool zero_ok = !finite_logits;  // every chosen logit -inf: the softmax row is 0
    for (Index j = 0; j < k; ++j) zero_ok = zero_ok && s[id[j]] == -std::numeric_limits<float>::infinity();
    check_weights(w, id, k, E, SumRule::normalized, scale, zero_ok, who, t);
    return;
  }
  if (o.renormalize) {
    // All 0 only without a finite chosen logit. Finite logits whose scores underflow in f32 (sigmoid or
    // sqrt-softplus far below 0, softmax scores of 0 chosen through the bias or the groups) are renormalised
    // in log space (reproducers: tests/fuzz/corpus/fuzz_router/underflow_*).
    bool zero_ok = !finite_logits;
    for (Index j = 0; j < k; ++j) {
      zero_ok = zero_ok && !(s[id[j]] > 0.0f) && !(chosen_logits[j] > -std::numeric_limits<float>::infinity());
      MOE_FUZZ_CHECK(s[id[j]] == 0.0f || chosen_logits[j] > -std::numeric_limits<float>::infinity(),
                     who << ": token " << t << " slot " << j << " has score " << s[id[j]] << " but saved logit "
                         << chosen_logits[j]);
    }
    check_weights(w, id, k, E, SumRule::normalized, scale, zero_ok, who, t);
    return;
  }
  // Not renormalised: the weight is the chosen score times the scaling factor, exactly.
  for (Index j = 0; j < k; ++j) {
    const float expected_w = o.routed_scaling_factor != 1.0 ? s[id[j]] * scale : s[id[j]];
    MOE_FUZZ_CHECK(w[j] == expected_w || (std::isnan(w[j]) && std::isnan(expected_w)),
                   who << ": token " << t << " slot " << j << " weight " << w[j] << " is not score × scale = " << expected_w);
  }
  const SumRule rule = o.score == routers::ScoreFunction::softmax   ? SumRule::probabilities
                       : o.score == routers::ScoreFunction::sigmoid ? SumRule::each_unit
                                                                    : SumRule::nonnegative;
  check_weights(w, id, k, E, rule, scale, false, who, t);
}

// The saved scores (T, E) and chosen logits (T, top_k) of token t of T.
const float* scores_row(const routers::TopKRouter<float>& r, const float* saved, Index t) { return saved + t * r.n_experts(); }
const float* chosen_logits_row(const routers::TopKRouter<float>& r, const float* saved, Index T, Index t) {
  return saved + T * r.n_experts() + t * r.top_k();
}

void check_top_k(const routers::TopKRouter<float>& r, const Routed& out, bool finite_logits, const char* who) {
  for (Index t = 0; t < out.n_tokens; ++t)
    check_top_k_token(r, scores_row(r, out.saved.data(), t), chosen_logits_row(r, out.saved.data(), out.n_tokens, t),
                      out.id(t), out.weight(t), finite_logits, who, t);
}

// True when every logit x Wᵀ (+ extra, scaled by 1/temperature, x jittered by up to 2x) is certainly finite in
// f32: x and W finite, the jittered x (up to 2x) finite too, and Σ_j max_t |x_tj| |W_ej| (+ extra) far below
// FLT_MAX. (An x near FLT_MAX jitters to ±inf before any product: reproducer
// tests/fuzz/corpus/fuzz_router/jitter_overflow_gating_residual.)
bool logits_finite(const Matrix& x, moe::ConstMatrixView<float> w, double temperature, double extra = 0) {
  if (!moe::fuzz::all_finite(x.data(), static_cast<std::size_t>(x.size())) || !std::isfinite(extra)) return false;
  std::vector<double> col_max(static_cast<std::size_t>(x.cols()), 0.0);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index j = 0; j < x.cols(); ++j)
      col_max[static_cast<std::size_t>(j)] = std::max(col_max[static_cast<std::size_t>(j)], std::abs(double(x(t, j))));
  for (double m : col_max)
    if (2.0 * m >= double(std::numeric_limits<float>::max())) return false;
  double worst = 0;
  for (Index e = 0; e < w.rows(); ++e) {
    double bound = extra;
    for (Index j = 0; j < w.cols(); ++j) {
      if (!std::isfinite(w(e, j))) return false;
      bound += 2.0 * col_max[static_cast<std::size_t>(j)] * std::abs(double(w(e, j)));
    }
    worst = std::max(worst, bound);
  }
  return worst * std::max(1.0, 1.0 / temperature) < 1e37;
}

// The same for logits given directly.
bool logits_finite(const Matrix& z, double temperature) {
  double worst = 0;
  for (Index i = 0; i < z.size(); ++i) {
    if (!std::isfinite(z.data()[i])) return false;
    worst = std::max(worst, std::abs(double(z.data()[i])));
  }
  return worst * std::max(1.0, 1.0 / temperature) < 1e37;
}

// ---------------------------------------------------------------------------------------------------------
// The other routers' oracles.

void check_null_experts(const routers::NullExpertRouter<float>& r, const Routed& out) {
  const Index n = r.n_experts(), width = n + r.n_null_experts(), k = r.top_k();
  for (Index t = 0; t < out.n_tokens; ++t) {
    const Index* id = out.id(t);
    const float* p = out.saved.data() + t * width;                 // (n + m) probabilities
    const float* z = out.saved.data() + out.n_tokens * width + t * k;  // (k) chosen true logits
    check_ids(id, k, n, true, "NullExpertRouter", t);
    const auto all = reference_top_k(p, width, k);
    bool zero_ok = true, any_true = false;
    for (Index s = 0; s < k; ++s) {
      const Index want = all[static_cast<std::size_t>(s)] < n ? all[static_cast<std::size_t>(s)] : -1;
      MOE_FUZZ_CHECK(id[s] == want, "NullExpertRouter: token " << t << " slot " << s << " holds " << id[s]
                                                               << ", the documented choice is " << want);
      if (id[s] >= 0) zero_ok = zero_ok && !(p[id[s]] > 0.0f) && !(z[s] > -std::numeric_limits<float>::infinity());
      any_true = any_true || id[s] >= 0;
    }
    // No true expert chosen: every slot unused, weights 0. Otherwise the true weights sum to 1, unless no chosen
    // true expert has a finite logit (probabilities that underflow are renormalised in log space).
    check_weights(out.weight(t), id, k, n, SumRule::normalized, 1.0f, zero_ok || !any_true, "NullExpertRouter", t);
  }
}

void check_dense_to_sparse(const routers::DenseToSparseGate<float>& r, const Routed& out) {
  const Index E = r.n_experts(), k = r.top_k();
  const bool gumbel_weights = r.training() && r.options().use_gumbel_gates;
  for (Index t = 0; t < out.n_tokens; ++t) {
    const Index* id = out.id(t);
    const float* w = out.weight(t);
    const float* s = out.saved.data() + t * E;
    check_ids(id, k, E, true, "DenseToSparseGate", t);
    Index used = 0;
    while (used < k && id[used] >= 0) ++used;
    for (Index j = used; j < k; ++j)
      MOE_FUZZ_CHECK(id[j] == -1, "DenseToSparseGate: token " << t << " has an active slot " << j << " after an unused one");
    const Index most = !r.training() || r.hard() ? 1 : k;
    MOE_FUZZ_CHECK(used <= most, "DenseToSparseGate: token " << t << " uses " << used << " slots, at most " << most);
    if (!r.training() || r.hard())
      MOE_FUZZ_CHECK(used == 1, "DenseToSparseGate: token " << t << " uses " << used << " slots in top-1 mode");
    if (!r.training()) {
      const auto best = reference_top_k(s, E, 1);
      MOE_FUZZ_CHECK(id[0] == best[0], "DenseToSparseGate: evaluation chose " << id[0] << ", argmax is " << best[0]);
    }
    for (Index j = 0; j < used; ++j) {
      const float want = r.hard() && gumbel_weights ? 1.0f : s[id[j]];
      MOE_FUZZ_CHECK(w[j] == want, "DenseToSparseGate: token " << t << " slot " << j << " weight " << w[j] << ", expected " << want);
    }
    check_weights(w, id, k, E, SumRule::probabilities, 1.0f, false, "DenseToSparseGate", t);
  }
}

void check_expert_choice(const routers::ExpertChoiceRouter<float>& r, const Routed& out) {
  const Index E = r.n_experts(), T = out.n_tokens, c = r.capacity(T);
  MOE_FUZZ_CHECK(T == 0 || (c >= 1 && c <= T), "ExpertChoiceRouter: capacity " << c << " for " << T << " tokens");
  std::vector<float> column(static_cast<std::size_t>(T));
  for (Index e = 0; e < E; ++e) {
    for (Index t = 0; t < T; ++t) {
      const float* s = out.saved.data() + t * E;
      const bool finite = std::any_of(s, s + E, [](float v) { return v > 0.0f; });
      column[static_cast<std::size_t>(t)] = finite ? s[e] : std::numeric_limits<float>::quiet_NaN();
    }
    std::vector<Index> chosen = reference_top_k(column.data(), T, c);
    std::sort(chosen.begin(), chosen.end());
    Index taken = 0;
    for (Index t = 0; t < T; ++t) {
      const Index id = out.id(t)[e];
      MOE_FUZZ_CHECK(id == e || id == -1, "ExpertChoiceRouter: token " << t << " slot " << e << " holds " << id);
      const bool want = std::binary_search(chosen.begin(), chosen.end(), t);
      MOE_FUZZ_CHECK((id == e) == want, "ExpertChoiceRouter: expert " << e << (want ? " did not take" : " took")
                                                                     << " token " << t << " against the documented choice");
      if (id == e) {
        ++taken;
        MOE_FUZZ_CHECK(out.weight(t)[e] == out.saved[static_cast<std::size_t>(t * E + e)],
                       "ExpertChoiceRouter: token " << t << " expert " << e << " weight is not S[t, e]");
      }
    }
    MOE_FUZZ_CHECK(taken == c, "ExpertChoiceRouter: expert " << e << " took " << taken << " tokens, capacity " << c);
  }
  for (Index t = 0; t < T; ++t)
    check_weights(out.weight(t), out.id(t), E, E, SumRule::probabilities, 1.0f, false, "ExpertChoiceRouter", t);
}

// CapacityLimited: the inner router's choice, minus the documented drops.
void check_capacity(const routers::CapacityLimited<routers::TopKRouter<float>>& r, const Routed& inner, const Routed& out) {
  const Index T = out.n_tokens, k = r.top_k(), E = r.n_experts(), cap = r.capacity(T);
  Index dropped = 0;
  for (Index i = 0; i < T * k; ++i) {
    const auto u = static_cast<std::size_t>(i);
    if (out.ids[u] == -1) {
      ++dropped;
      MOE_FUZZ_CHECK(out.w[u] == 0.0f, "CapacityLimited: dropped slot " << i << " weighs " << out.w[u]);
    } else {
      MOE_FUZZ_CHECK(out.ids[u] == inner.ids[u] && (out.w[u] == inner.w[u] || (std::isnan(out.w[u]) && std::isnan(inner.w[u]))),
                     "CapacityLimited: kept slot " << i << " changed from (" << inner.ids[u] << ", " << inner.w[u] << ") to ("
                                                   << out.ids[u] << ", " << out.w[u] << ")");
    }
  }
  MOE_FUZZ_CHECK(out.dropped_slots == dropped,
                 "CapacityLimited: reports " << out.dropped_slots << " dropped slots, ids show " << dropped);
  // Per expert: its slots in token order; the kept ones are the documented first `cap`.
  for (Index e = 0; e < E; ++e) {
    std::vector<Index> slots;  // (token, slot) indices routed to e before dropping
    for (Index i = 0; i < T * k; ++i)
      if (inner.ids[static_cast<std::size_t>(i)] == e) slots.push_back(i);
    if (r.options().drop_policy == routers::DropPolicy::probability)
      std::stable_sort(slots.begin(), slots.end(), [&](Index a, Index b) {
        return inner.w[static_cast<std::size_t>(a)] > inner.w[static_cast<std::size_t>(b)];
      });
    for (std::size_t j = 0; j < slots.size(); ++j) {
      const bool kept = out.ids[static_cast<std::size_t>(slots[j])] == e;
      MOE_FUZZ_CHECK(kept == (static_cast<Index>(j) < cap),
                     "CapacityLimited: expert " << e << " (capacity " << cap << ") " << (kept ? "kept" : "dropped")
                                                << " its " << j << "-th slot " << slots[j] << " in policy order");
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The same router inside a MoELayer with copy experts (the path users take).

struct LayerCase {
  const Matrix* x = nullptr;
  bool x_finite = true;  // x and the links finite: the layer must accept the batch (else it must reject it)
  std::vector<Index> sequence_starts{};
  moe::LayerLinks<float> links{};  // a gating residual's previous logits and logits output
};

template <class R>
void check_layer(const R& router, const LayerCase& c, const Routed& direct, ByteReader& in) {
  const Index T = c.x->rows(), d = c.x->cols(), k = router.top_k(), E = router.n_experts();
  moe::MoELayer<R, moe::experts::CopyExperts<float>> layer(router, moe::experts::CopyExperts<float>(E, d));
  Matrix y = Matrix::Constant(T, d, std::numeric_limits<float>::quiet_NaN());
  moe::Workspace ws;
  moe::ForwardResult<float> res;
  bool threw = false;
  try {
    res = layer.forward(*c.x, y, ws, c.sequence_starts, c.links);
  } catch (const moe::Error& e) {
    threw = true;
    MOE_FUZZ_CHECK(!c.x_finite, "MoELayer::forward threw on finite x: " << e.what());
  }
  if (threw) return;
  MOE_FUZZ_CHECK(c.x_finite, "MoELayer::forward accepted an x holding NaN or ±inf");
  if (T == 0) {
    MOE_FUZZ_CHECK(res.expert_ids.empty() && res.tokens_per_expert.empty(), "MoELayer: T = 0 gave a non-empty result");
    return;
  }
  MOE_FUZZ_CHECK(res.n_tokens == T && res.top_k == k && static_cast<Index>(res.expert_ids.size()) == T * k &&
                     static_cast<Index>(res.tokens_per_expert.size()) == E,
                 "MoELayer: result shape");
  std::vector<Index> count(static_cast<std::size_t>(E), 0);
  Index unused = 0;
  for (Index t = 0; t < T; ++t) {
    Index active = 0;
    double w_sum = 0, w_abs = 0;
    for (Index s = 0; s < k; ++s) {
      const auto i = static_cast<std::size_t>(t * k + s);
      const Index id = res.expert_ids[i];
      MOE_FUZZ_CHECK(id == direct.ids[i], "MoELayer: token " << t << " slot " << s << " routed to " << id
                                                             << ", the router alone chose " << direct.ids[i]);
      const float w = res.expert_weights[i];
      MOE_FUZZ_CHECK(w == direct.w[i] || (std::isnan(w) && std::isnan(direct.w[i])),
                     "MoELayer: token " << t << " slot " << s << " weight " << w << ", the router alone gave " << direct.w[i]);
      if (id >= 0) {
        ++count[static_cast<std::size_t>(id)];
        ++active;
        w_sum += double(w);
        w_abs += std::abs(double(w));
      } else {
        ++unused;
      }
    }
    MOE_FUZZ_CHECK(res.experts_per_token[static_cast<std::size_t>(t)] == active,
                   "MoELayer: experts_per_token[" << t << "] = " << res.experts_per_token[static_cast<std::size_t>(t)]
                                                  << ", ids show " << active);
    // Copy experts: y = Σ_kept w x, each element an FMA chain of `active` terms.
    if (!std::isfinite(w_abs)) continue;
    for (Index j = 0; j < d; ++j) {
      const double xv = double((*c.x)(t, j)), want = w_sum * xv, scale = w_abs * std::abs(xv);
      if (!(scale < double(std::numeric_limits<float>::max()) / 2)) continue;
      // γ_{active+1} relative, and 2^-150 absolute per rounding in the subnormal range.
      const double tol = double(active + 1) * k_u32 / (1.0 - double(active + 1) * k_u32) * scale +
                         double(active) * 0x1.0p-150;
      MOE_FUZZ_CHECK(std::abs(double(y(t, j)) - want) <= tol,
                     "MoELayer: copy-expert output (" << t << ", " << j << ") = " << y(t, j) << ", expected " << want << " ± " << tol);
    }
  }
  for (Index e = 0; e < E; ++e)
    MOE_FUZZ_CHECK(res.tokens_per_expert[static_cast<std::size_t>(e)] == count[static_cast<std::size_t>(e)],
                   "MoELayer: tokens_per_expert[" << e << "] = " << res.tokens_per_expert[static_cast<std::size_t>(e)]
                                                  << ", ids show " << count[static_cast<std::size_t>(e)]);
  MOE_FUZZ_CHECK(res.dropped_slots == direct.dropped_slots,
                 "MoELayer: dropped_slots " << res.dropped_slots << ", the router reported " << direct.dropped_slots);

  // A training forward routes the same (bitwise), and its backward runs on whatever the forward saved (NaN or
  // infinite logits, unused slots) without a sanitizer report or an exception for a finite dy.
  moe::TrainingContext<float> ctx;
  Matrix y2(T, d), dy(T, d), dx(T, d);
  const auto train = layer.forward(*c.x, y2, ctx, c.sequence_starts, c.links);
  for (Index i = 0; i < T * k; ++i) {
    const auto u = static_cast<std::size_t>(i);
    MOE_FUZZ_CHECK(train.expert_ids[u] == res.expert_ids[u] &&
                       std::memcmp(&train.expert_weights[u], &res.expert_weights[u], sizeof(float)) == 0,
                   "MoELayer: the training forward routed slot " << i << " differently");
  }
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = in.moderate_float();
  try {
    layer.backward(dy, dx, ctx);
  } catch (const moe::Error& e) {
    MOE_FUZZ_CHECK(false, "MoELayer::backward threw on a finite dy: " << e.what());
  }
}

// B3: a token's routing is a function of its own row. Replaces row b by a benign or special row and requires
// every other token's ids, weights and saved rows to stay bitwise equal (the saved blocks of saved_blocks).
template <class Route>
void check_token_independence(const Matrix& x, const Routed& base, ByteReader& in, Route&& route) {
  const Index T = x.rows();
  if (T < 2) return;
  const Index b = in.below(T);
  Matrix x2 = x;
  for (Index j = 0; j < x.cols(); ++j) x2(b, j) = in.flag() ? 0.0f : in.special_float();
  const Routed other = route(x2);
  for (Index t = 0; t < T; ++t) {
    if (t == b) continue;
    for (Index s = 0; s < base.slots; ++s) {
      const auto i = static_cast<std::size_t>(t * base.slots + s);
      const bool same_w = std::memcmp(&base.w[i], &other.w[i], sizeof(float)) == 0;
      MOE_FUZZ_CHECK(base.ids[i] == other.ids[i] && same_w,
                     "token " << t << " slot " << s << " changed from (" << base.ids[i] << ", " << base.w[i] << ") to ("
                              << other.ids[i] << ", " << other.w[i] << ") when only token " << b << "'s row changed");
    }
    Index block_start = 0;
    for (const Index width : base.saved_widths) {
      for (Index j = 0; j < width; ++j) {
        const auto i = static_cast<std::size_t>(block_start + t * width + j);
        MOE_FUZZ_CHECK(std::memcmp(&base.saved[i], &other.saved[i], sizeof(float)) == 0,
                       "token " << t << " saved[" << j << "] of a block of width " << width
                                << " changed when only token " << b << "'s row changed");
      }
      block_start += T * width;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// One fuzz case.

enum class Kind { top_k, top_k_softmax, capacity, null_experts, dense_to_sparse, expert_choice, sequence_level,
                  gating_residual, with_losses, null_experts_with_losses, capacity_with_losses, count };

struct Case {
  Index T = 0, E = 1, k = 1, d = 1;
  Matrix x;
  bool x_finite = true;
  bool logits_mode = false;  // route_logits on logits from the bytes instead of route(x)
};

void fill_matrix(ByteReader& in, moe::MatrixView<float> m) {
  std::vector<float> v(static_cast<std::size_t>(m.rows() * m.cols()));
  in.fill(v.data(), v.size());
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = v[static_cast<std::size_t>(i * m.cols() + j)];
}

// x: finite by default (the layer rejects NaN and ±inf in x, the routers do not check); non-finite
// values when the bytes ask, to check that the layer rejects them and that the routers survive them.
void read_tokens(ByteReader& in, Case& c) {
  c.x.resize(c.T, c.d);
  const bool allow_non_finite = in.byte() < 48;
  fill_matrix(in, c.x);
  if (!allow_non_finite)
    for (Index i = 0; i < c.x.size(); ++i)
      if (!std::isfinite(c.x.data()[i])) c.x.data()[i] = std::signbit(c.x.data()[i]) ? -3.0f : 3.0f;
  c.x_finite = moe::fuzz::all_finite(c.x.data(), static_cast<std::size_t>(c.x.size()));
}

LayerCase layer_case(const Case& c) { return {.x = &c.x, .x_finite = c.x_finite}; }

// The gate, then (with the selection bias) the bias, from the bytes.
void fill_top_k(ByteReader& in, routers::TopKRouter<float>& r) {
  fill_matrix(in, r.gate());
  if (!r.bias().empty()) in.fill(r.bias().data(), r.bias().size());
}

// The router wrap(TopKRouter) builds around a TopKRouter of the setup whose gate and bias come from the bytes;
// nullopt when a constructor rejects an option.
template <class Wrap>
auto wrapped_top_k(ByteReader& in, const moe::MoEConfig& cfg, const TopKSetup& setup, Wrap&& wrap)
    -> std::optional<decltype(wrap(std::declval<routers::TopKRouter<float>>()))> {
  try {
    routers::TopKRouter<float> top_k(cfg, setup.options);
    configure(top_k, setup);
    fill_top_k(in, top_k);
    return wrap(std::move(top_k));
  } catch (const moe::Error&) {
    return std::nullopt;
  }
}

void run_top_k(ByteReader& in, Case& c, bool softmax_preset) {
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  TopKSetup setup = read_top_k_setup(in, c.E);
  std::optional<routers::TopKRouter<float>> r;
  try {
    if (softmax_preset) {
      r.emplace(routers::TopKSoftmax<float>(cfg, {.renormalize = in.flag()}));
    } else {
      r.emplace(cfg, setup.options);
      configure(*r, setup);
    }
  } catch (const moe::Error&) {
    return;  // an invalid option, rejected by the constructor
  }
  fill_top_k(in, *r);
  if (c.logits_mode) {
    Matrix z(c.T, c.E);
    fill_matrix(in, z);
    const Routed out = route_from_logits(*r, z);
    check_top_k(*r, out, logits_finite(z, r->options().temperature), "TopKRouter::route_logits");
    return;
  }
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  check_top_k(*r, out, logits_finite(c.x, std::as_const(*r).gate(), r->options().temperature), "TopKRouter");
  // The scores, then the chosen logits.
  check_token_independence(c.x, out, in, [&](const Matrix& x2) { return route_x(*r, x2); });
  check_layer(*r, layer_case(c), out, in);
}

void run_capacity(ByteReader& in, Case& c) {
  static constexpr double k_factor[] = {1.0, 1.25, 2.0, 0.5, 0.01, 1e9, 0.0};
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const TopKSetup setup = read_top_k_setup(in, c.E);
  const routers::CapacityOptions options{.capacity_factor = in.pick(k_factor),
                                         .drop_policy = static_cast<routers::DropPolicy>(in.below(2))};
  auto r = wrapped_top_k(in, cfg, setup, [&](routers::TopKRouter<float>&& t) {
    return routers::CapacityLimited<routers::TopKRouter<float>>(std::move(t), options);
  });
  if (!r) return;
  read_tokens(in, c);
  const Routed inner = route_x(r->inner(), c.x);
  check_top_k(r->inner(), inner, logits_finite(c.x, std::as_const(*r).inner().gate(), setup.options.temperature),
              "CapacityLimited's inner router");
  const Routed out = route_x(*r, c.x);
  check_capacity(*r, inner, out);
  check_layer(*r, layer_case(c), out, in);
}

void run_null_experts(ByteReader& in, Case& c) {
  const Index m = in.below(9);  // null experts
  c.k = 1 + in.below(c.E + m);
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const routers::NullExpertOptions options{.n_null_experts = m, .separate_null_projection = in.flag()};
  std::optional<routers::NullExpertRouter<float>> r;
  try {
    r.emplace(cfg, options);
  } catch (const moe::Error&) {
    return;
  }
  fill_matrix(in, r->gate());
  if (options.separate_null_projection && m > 0) fill_matrix(in, r->null_gate());
  if (c.logits_mode) {
    Matrix z(c.T, c.E + m);
    fill_matrix(in, z);
    check_null_experts(*r, route_from_logits(*r, z));
    return;
  }
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  check_null_experts(*r, out);
  // The probabilities, then the chosen logits.
  check_token_independence(c.x, out, in, [&](const Matrix& x2) { return route_x(*r, x2); });
  check_layer(*r, layer_case(c), out, in);
}

void run_dense_to_sparse(ByteReader& in, Case& c) {
  static constexpr double k_threshold[] = {0.001, 0.001, 0.1, 0.5, 1e-30, 0.999, 0.0};
  static constexpr double k_temperature[] = {1.0, 0.5, 2.0, 1e-3, 1e3};
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  routers::DenseToSparseOptions o;
  o.threshold = in.pick(k_threshold);
  o.max_temperature = in.pick(k_temperature);
  o.min_temperature = std::min(o.max_temperature, in.pick(k_temperature));
  o.decay = static_cast<routers::TemperatureDecay>(in.below(3));
  o.decay_steps = 1 + in.below(2000);
  o.hard_switch_step = in.flag() ? -1 : in.below(300);
  o.use_gumbel_gates = in.flag();
  o.seed = in.byte();
  std::optional<routers::DenseToSparseGate<float>> r;
  try {
    r.emplace(cfg, o);
  } catch (const moe::Error&) {
    return;
  }
  r->set_training(in.flag());
  r->set_step(static_cast<std::uint64_t>(in.below(4000)));
  fill_matrix(in, r->gate());
  if (c.logits_mode) {
    Matrix z(c.T, c.E);
    fill_matrix(in, z);
    check_dense_to_sparse(*r, route_from_logits(*r, z));
    return;
  }
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  check_dense_to_sparse(*r, out);
  check_token_independence(c.x, out, in, [&](const Matrix& x2) { return route_x(*r, x2); });
  check_layer(*r, layer_case(c), out, in);
}

void run_expert_choice(ByteReader& in, Case& c) {
  static constexpr double k_factor[] = {2.0, 1.0, 0.5, 1e-3, 100.0, 1e300, 0.0};
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  std::optional<routers::ExpertChoiceRouter<float>> r;
  try {
    r.emplace(cfg, routers::ExpertChoiceOptions{.capacity_factor = in.pick(k_factor)});
  } catch (const moe::Error&) {
    return;
  }
  fill_matrix(in, r->gate());
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  check_expert_choice(*r, out);
  check_layer(*r, layer_case(c), out, in);
}

void run_sequence_level(ByteReader& in, Case& c) {
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const TopKSetup setup = read_top_k_setup(in, c.E);
  auto r = wrapped_top_k(in, cfg, setup, [](routers::TopKRouter<float>&& t) {
    return routers::SequenceLevel<routers::TopKRouter<float>>(std::move(t));
  });
  if (!r) return;
  read_tokens(in, c);
  // Sequences: starts ascending from 0, each token starting one with probability ~1/4.
  std::vector<Index> starts;
  std::vector<Index> sequence_of_token(static_cast<std::size_t>(c.T));
  for (Index t = 0; t < c.T; ++t) {
    if (t == 0 || in.below(4) == 0) starts.push_back(t);
    sequence_of_token[static_cast<std::size_t>(t)] = static_cast<Index>(starts.size()) - 1;
  }
  const auto n_seq = static_cast<Index>(starts.size());
  // A sequence's mean has |mean_j| <= max_t |x_tj|: the same bound as the tokens'.
  const bool finite = logits_finite(c.x, std::as_const(*r).inner().gate(), setup.options.temperature);
  const Routed out = route_x(*r, c.x, {.sequence_of_token = sequence_of_token.data(), .n_sequences = n_seq});
  for (Index t = 0; t < c.T; ++t) {
    const Index q = sequence_of_token[static_cast<std::size_t>(t)];
    const Index first = starts[static_cast<std::size_t>(q)];
    // The inner router saw n_seq rows: the first n_seq rows of its (T, E) scores and (T, top_k) chosen logits.
    check_top_k_token(r->inner(), scores_row(r->inner(), out.saved.data(), q),
                      chosen_logits_row(r->inner(), out.saved.data(), c.T, q), out.id(t), out.weight(t), finite,
                      "SequenceLevel", t);
    for (Index s = 0; s < c.k; ++s)
      MOE_FUZZ_CHECK(out.id(t)[s] == out.id(first)[s] && std::memcmp(out.weight(t) + s, out.weight(first) + s, sizeof(float)) == 0,
                     "SequenceLevel: token " << t << " slot " << s << " differs from its sequence's first token " << first);
  }
  LayerCase lc = layer_case(c);
  lc.sequence_starts = starts;
  check_layer(*r, lc, out, in);
}

void run_gating_residual(ByteReader& in, Case& c) {
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const TopKSetup setup = read_top_k_setup(in, c.E);
  auto r = wrapped_top_k(in, cfg, setup, [](routers::TopKRouter<float>&& t) {
    return routers::GatingResidual<routers::TopKRouter<float>>(std::move(t));
  });
  if (!r) return;
  fill_matrix(in, r->gate_map());
  read_tokens(in, c);
  // The previous layer's logits (any values: they come from another layer's gate) and an output.
  Matrix previous(c.T, c.E), logits_out(c.T, c.E);
  fill_matrix(in, previous);
  const bool bound = in.flag();
  const bool write_logits = bound && in.flag();
  const Routed out = run_router(
      *r, c.T, [&](moe::Arena& a, bool measuring, moe::RouteOutputOf<std::remove_reference_t<decltype(*r)>>& o) {
        if (write_logits) o.logits = moe::MatrixView<float>(logits_out);
        r->route({.x = measuring ? moe::ConstMatrixView<float>::shape_only(c.T, c.d) : moe::ConstMatrixView<float>(c.x),
                  .previous_logits = bound ? moe::ConstMatrixView<float>(previous) : moe::ConstMatrixView<float>()},
                 o, a);
      });
  // The residual adds previous · mapᵀ: bounded by Σ|previous| |map| when bound.
  double extra = 0;
  if (bound) {
    for (Index t = 0; t < c.T; ++t)
      for (Index e = 0; e < c.E; ++e) {
        double row = 0;
        for (Index f = 0; f < c.E; ++f) row += std::abs(double(previous(t, f)) * double(std::as_const(*r).gate_map()(e, f)));
        extra = std::isfinite(row) ? std::max(extra, row) : std::numeric_limits<double>::infinity();
      }
  }
  check_top_k(r->inner(), out, logits_finite(c.x, std::as_const(*r).inner().gate(), setup.options.temperature, extra),
              "GatingResidual");
  // The layer gets the same links, and rejects non-finite previous logits as it rejects a non-finite x.
  LayerCase lc = layer_case(c);
  if (bound) {
    lc.links.previous_logits = moe::ConstMatrixView<float>(previous);
    lc.x_finite = lc.x_finite && previous.allFinite();
  }
  if (write_logits) lc.links.logits = moe::MatrixView<float>(logits_out);
  check_layer(*r, lc, out, in);
}

void run_with_losses(ByteReader& in, Case& c) {
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const TopKSetup setup = read_top_k_setup(in, c.E);
  using R = routers::WithLosses<routers::TopKRouter<float>, moe::losses::SwitchLoss, moe::losses::ZLoss>;
  auto r = wrapped_top_k(in, cfg, setup, [](routers::TopKRouter<float>&& t) {
    return R(std::move(t), moe::losses::SwitchLoss{}, moe::losses::ZLoss{});
  });
  if (!r) return;
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  check_top_k(r->inner(), out, logits_finite(c.x, std::as_const(*r).inner().gate(), setup.options.temperature),
              "WithLosses");
  // The losses read the logits the choice is made on: the same choice as the router alone, bitwise.
  const Routed alone = route_x(r->inner(), c.x);
  for (std::size_t i = 0; i < out.ids.size(); ++i)
    MOE_FUZZ_CHECK(out.ids[i] == alone.ids[i] && std::memcmp(&out.w[i], &alone.w[i], sizeof(float)) == 0,
                   "WithLosses: slot " << i << " differs from the inner router alone");
  MOE_FUZZ_CHECK(out.n_losses == 2, "WithLosses: " << out.n_losses << " losses reported");
  // Finite logits (no overflow in W x) give finite losses.
  bool finite_logits = c.x_finite && moe::fuzz::all_finite(r->inner().gate().data(), static_cast<std::size_t>(c.E * c.d));
  for (Index t = 0; t < c.T && finite_logits; ++t) {
    for (Index e = 0; e < c.E; ++e) {
      double bound = 0;
      for (Index j = 0; j < c.d; ++j) bound += std::abs(double(c.x(t, j)) * double(r->inner().gate()(e, j)));
      finite_logits = finite_logits && bound / std::min(1.0, setup.options.temperature) < 1e38;
    }
  }
  if (finite_logits && !setup.options.gumbel_noise && setup.options.jitter == 0.0)
    for (Index i = 0; i < 2; ++i)
      MOE_FUZZ_CHECK(
          std::isfinite(out.losses[static_cast<std::size_t>(i)]),
          "WithLosses: loss " << i << " = " << out.losses[static_cast<std::size_t>(i)] << " from finite logits");
  check_layer(*r, layer_case(c), out, in);
}

// AdaMoE's null experts with balance losses over the n + m columns: the same choice as the router alone.
void run_null_experts_with_losses(ByteReader& in, Case& c) {
  const Index m = in.below(9);
  c.k = 1 + in.below(c.E + m);
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  using R = routers::WithLosses<routers::NullExpertRouter<float>, moe::losses::SwitchLoss, moe::losses::ZLoss>;
  std::optional<R> r;
  try {
    r.emplace(routers::NullExpertRouter<float>(cfg, {.n_null_experts = m, .separate_null_projection = in.flag()}),
              moe::losses::SwitchLoss{}, moe::losses::ZLoss{});
  } catch (const moe::Error&) {
    return;
  }
  fill_matrix(in, r->inner().gate());
  if (m > 0 && in.flag()) {
    try {
      fill_matrix(in, r->inner().null_gate());
    } catch (const moe::Error&) {  // one gate holds the null rows: nothing separate to fill
    }
  }
  read_tokens(in, c);
  const Routed out = route_x(*r, c.x);
  const Routed alone = route_x(r->inner(), c.x);
  check_null_experts(r->inner(), alone);
  for (std::size_t i = 0; i < out.ids.size(); ++i)
    MOE_FUZZ_CHECK(out.ids[i] == alone.ids[i] && std::memcmp(&out.w[i], &alone.w[i], sizeof(float)) == 0,
                   "WithLosses<NullExpertRouter>: slot " << i << " differs from the router alone");
  check_layer(*r, layer_case(c), out, in);
}

// Megatron's order: the losses see the choice before dropping, the capacity limit drops after.
void run_capacity_with_losses(ByteReader& in, Case& c) {
  static constexpr double k_factor[] = {1.0, 1.25, 0.5, 0.01};
  const moe::MoEConfig cfg{.d_model = c.d, .d_ff = 1, .n_experts = c.E, .top_k = c.k};
  const TopKSetup setup = read_top_k_setup(in, c.E);
  using Inner = routers::WithLosses<routers::TopKRouter<float>, moe::losses::SwitchLoss, moe::losses::ZLoss>;
  const routers::CapacityOptions options{.capacity_factor = in.pick(k_factor),
                                         .drop_policy = static_cast<routers::DropPolicy>(in.below(2))};
  auto r = wrapped_top_k(in, cfg, setup, [&](routers::TopKRouter<float>&& t) {
    return routers::CapacityLimited<Inner>(Inner(std::move(t), moe::losses::SwitchLoss{}, moe::losses::ZLoss{}), options);
  });
  if (!r) return;
  auto& top_k = r->inner().inner();
  read_tokens(in, c);
  const Routed inner = route_x(r->inner(), c.x);
  check_top_k(top_k, inner, logits_finite(c.x, std::as_const(top_k).gate(), setup.options.temperature),
              "CapacityLimited<WithLosses>'s inner router");
  const Routed out = route_x(*r, c.x);
  // The same drop rules as CapacityLimited<TopKRouter>, from the inner choice; the losses come through.
  const routers::CapacityLimited<routers::TopKRouter<float>> plain(top_k, options);
  check_capacity(plain, inner, out);
  MOE_FUZZ_CHECK(out.n_losses == 2, "CapacityLimited<WithLosses>: " << out.n_losses << " losses reported");
  check_layer(*r, layer_case(c), out, in);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  Case c;
  const auto kind = static_cast<Kind>(in.below(static_cast<std::int64_t>(Kind::count)));
  c.T = in.below(k_max_tokens + 1);
  c.E = 1 + in.below(k_max_experts);
  c.k = 1 + in.below(c.E);
  c.d = 1 + in.below(k_max_d_model);
  c.logits_mode = in.byte() < 64;
  switch (kind) {
    case Kind::top_k: run_top_k(in, c, false); break;
    case Kind::top_k_softmax: run_top_k(in, c, true); break;
    case Kind::capacity: run_capacity(in, c); break;
    case Kind::null_experts: run_null_experts(in, c); break;
    case Kind::dense_to_sparse: run_dense_to_sparse(in, c); break;
    case Kind::expert_choice: run_expert_choice(in, c); break;
    case Kind::sequence_level: run_sequence_level(in, c); break;
    case Kind::gating_residual: run_gating_residual(in, c); break;
    case Kind::with_losses: run_with_losses(in, c); break;
    case Kind::null_experts_with_losses: run_null_experts_with_losses(in, c); break;
    case Kind::capacity_with_losses: run_capacity_with_losses(in, c); break;
    case Kind::count: break;
  }
  return 0;
}
