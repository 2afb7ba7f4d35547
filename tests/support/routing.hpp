#pragma once
// Router test harness: run a router on a batch (outputs poisoned first, RELIABILITY H3), check the routing
// invariants (I1), and check route_backward against central differences (G1) with the choice held fixed.

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/config.hpp>
#include <moe/parameter.hpp>
#include <moe/route_io.hpp>
#include <moe/workspace.hpp>

#include "support/gradcheck.hpp"
#include "support/random.hpp"

namespace moe::test {

/// One router's outputs for a batch: ids and weights, and `out`, the RouteOutput the router wrote (views
/// into ids, weights and `saved_ws`, which holds the router's Saved block; its reports).
template <class R>
struct Routing {
  using T = typename R::Scalar;
  Index n_tokens = 0;
  Index slots = 0;
  std::vector<Index> ids;  // (n_tokens, slots)
  std::vector<T> weights;  // (n_tokens, slots)
  Workspace saved_ws;      // the Saved block
  std::size_t saved_bytes = 0;  // bytes of saved_ws it spans (poisoned with 0xFF first: NaN)
  RouteOutputOf<R> out;
  Index id(Index t, Index s) const { return ids[static_cast<std::size_t>(t * slots + s)]; }
  T weight(Index t, Index s) const { return weights[static_cast<std::size_t>(t * slots + s)]; }
};

/// Runs `call(out, arena)` for a batch of n_tokens, every output poisoned first (ids -7, values NaN) so that a
/// slot left unwritten shows; the workspace is sized by a measuring run first.
template <class R, class Call>
Routing<R> run_router(const R& router, Index n_tokens, Call&& call) {
  using T = typename R::Scalar;
  Routing<R> r;
  r.n_tokens = n_tokens;
  r.slots = router.top_k();
  const auto n = static_cast<std::size_t>(n_tokens * router.top_k());
  r.ids.assign(n, -7);
  r.weights.assign(n, std::numeric_limits<T>::quiet_NaN());
  Arena measure_saved;
  router.carve_saved(measure_saved, n_tokens);
  r.saved_bytes = measure_saved.peak();
  r.saved_ws.reserve(r.saved_bytes);
  std::fill_n(reinterpret_cast<unsigned char*>(r.saved_ws.data()), r.saved_bytes, 0xFF);
  Arena saved(r.saved_ws);
  r.out.saved = router.carve_saved(saved, n_tokens);
  r.out.ids = r.ids.data();
  r.out.weights = r.weights.data();
  r.out.dropped_slots = -1;  // the reports poisoned too: a router that reports must write them
  r.out.n_losses = -1;
  Arena measure;
  RouteOutputOf<R> sizing;
  call(sizing, measure);
  Workspace ws(measure.peak());
  Arena arena(ws);
  call(r.out, arena);
  return r;
}

/// Routes x (n_tokens, d_model) with `router` (a batch without sequences, not training).
template <class R>
Routing<R> route(const R& router, ConstMatrixView<typename R::Scalar> x) {
  return run_router(router, x.rows(), [&](RouteOutputOf<R>& out, Arena& arena) {
    const auto rows = arena.measuring() ? ConstMatrixView<typename R::Scalar>::shape_only(x.rows(), x.cols()) : x;
    router.route({.x = rows}, out, arena);
  });
}

/// Routes given logits (n_tokens, n_experts) with `router.route_logits`.
template <class R>
Routing<R> route_logits(const R& router, ConstMatrixView<typename R::Scalar> logits) {
  return run_router(router, logits.rows(),
                    [&](RouteOutputOf<R>& out, Arena& arena) { router.route_logits(logits, out, arena); });
}

/// The (n_tokens, width) rows of a saved buffer p, as a vector (row t at t * width).
template <class T>
std::vector<T> saved_rows(const T* p, Index n_tokens, Index width) {
  return std::vector<T>(p, p + n_tokens * width);
}

/// What the invariants expect of the weights.
struct WeightRule {
  bool sums_to_one = true;  // renormalised: |Σw - scale| <= 4·k·u·scale; else Σw <= scale·(1 + E·u)
  double scale = 1.0;       // every weight in [0, scale]
  bool unused_allowed = false;  // slots may hold -1 (weight 0)
};

/// RELIABILITY I1: ids distinct and in [0, n_experts) (or -1 with weight 0 where allowed), weights finite and
/// in [0, scale], sums within 4·k·u of the scale (renormalised) or at most scale·(1 + E·u). Returns the slots
/// checked, so a sweep can assert it covered what it meant to.
template <class R>
Index check_invariants(const Routing<R>& r, Index n_experts, WeightRule rule) {
  const double u = std::numeric_limits<typename R::Scalar>::epsilon() / 2;
  std::vector<bool> seen(static_cast<std::size_t>(n_experts));
  for (Index t = 0; t < r.n_tokens; ++t) {
    // Plain checks, one assertion per token: the sweeps check millions of slots.
    const char* broken = nullptr;
    std::fill(seen.begin(), seen.end(), false);
    double sum = 0;
    Index used = 0;
    for (Index s = 0; s < r.slots && broken == nullptr; ++s) {
      const Index e = r.id(t, s);
      const double w = static_cast<double>(r.weight(t, s));
      if (!std::isfinite(w)) broken = "a weight is not finite";
      else if (e == -1 && rule.unused_allowed) broken = w == 0.0 ? nullptr : "an unused slot has a weight";
      else if (e < 0 || e >= n_experts) broken = "an id is out of range";
      else if (seen[static_cast<std::size_t>(e)]) broken = "an id repeats";
      else if (w < 0.0 || w > rule.scale * (1 + 4 * u)) broken = "a weight is outside [0, scale]";
      if (e >= 0 && e < n_experts) {
        seen[static_cast<std::size_t>(e)] = true;
        sum += w;
        ++used;
      }
    }
    if (broken == nullptr && rule.sums_to_one && used > 0 &&
        std::abs(sum - rule.scale) > 4.0 * static_cast<double>(r.slots) * u * rule.scale)
      broken = "renormalised weights do not sum to the scale";
    if (broken == nullptr && !rule.sums_to_one && sum > rule.scale * (1 + static_cast<double>(n_experts) * u))
      broken = "the weights sum above the scale";
    if (broken != nullptr) {
      std::ostringstream row;
      for (Index s = 0; s < r.slots; ++s) row << " (" << r.id(t, s) << ", " << r.weight(t, s) << ")";
      FAIL("token " << t << ": " << broken << ";" << row.str());
    }
  }
  return r.n_tokens * r.slots;
}

/// Sorted (descending) copy of row t of a (rows, n) buffer.
template <class T>
std::vector<double> sorted_row(const T* m, Index t, Index n) {
  std::vector<double> v(m + t * n, m + (t + 1) * n);
  std::sort(v.begin(), v.end(), std::greater<>());
  return v;
}

/// Largest |gradient| seen, for the non-vacuity checks.
struct RouterGradStats {
  double max_abs_dx = 0;
  double max_abs_dparam = 0;
  double max_abs_error = 0;  // largest |analytic - numeric| over dx and every parameter
};

/// G1 for a TrainableRouter in double: L = Σ weights ⊙ r with a random r; checks dx and every parameter
/// against central differences, and that no ±h probe changes the choice (the point is differentiable).
/// `check_gaps(routing)` asserts the router-specific margins before the probes.
template <class R, class Gaps>
RouterGradStats check_router_gradient(R& router, RowMatrix<double>& x, std::uint64_t seed, Gaps&& check_gaps) {
  const Index n_tokens = x.rows(), k = router.top_k(), d = x.cols();
  Rng rng(seed);
  const RowMatrix<double> r = normal_matrix<double>(rng, n_tokens, k);
  const Routing<R> base = route(router, x);
  check_gaps(base);
  RowMatrix<double> dx = RowMatrix<double>::Zero(n_tokens, d);
  router.visit_parameters([](std::string_view, Parameter<double>& p) { p.zero_grad(); });
  {
    Arena measure;
    router.route_backward({.x = ConstMatrixView<double>::shape_only(n_tokens, d)}, RouteOutputOf<R>{},
                          {.dx = MatrixView<double>::shape_only(n_tokens, d)}, measure);
    Workspace ws(measure.peak());
    Arena arena(ws);
    router.route_backward({.x = x}, base.out, {.dweights = r.data(), .dx = dx}, arena);
  }
  const auto loss = [&] {
    const Routing<R> now = route(router, x);
    REQUIRE(now.ids == base.ids);  // no probe may flip the choice
    double l = 0;
    for (Index i = 0; i < n_tokens * k; ++i) l += now.weights[static_cast<std::size_t>(i)] * r.data()[i];
    return l;
  };
  RouterGradStats stats;
  const auto sx = check_gradient("dx", x.data(), dx.data(), x.size(), loss);
  stats.max_abs_dx = sx.max_abs_numeric;
  stats.max_abs_error = sx.max_abs_error;
  router.visit_parameters([&](std::string_view name, Parameter<double>& p) {
    const auto s = check_gradient(std::string(name), p.data(), p.grad().data(), p.rows() * p.cols(), loss);
    stats.max_abs_dparam = std::max(stats.max_abs_dparam, s.max_abs_numeric);
    stats.max_abs_error = std::max(stats.max_abs_error, s.max_abs_error);
  });
  return stats;
}

/// Sets a (rows, cols) gate to the identity on its leading square, so logits equal the token's first entries.
template <class T>
void set_identity(MatrixView<T> gate) {
  for (Index i = 0; i < gate.rows(); ++i)
    for (Index j = 0; j < gate.cols(); ++j) gate(i, j) = i == j ? T(1) : T(0);
}

}  // namespace moe::test
