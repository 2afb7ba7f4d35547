#pragma once
/// @file moe_layer.hpp
/// @brief MoELayer<Router, Banks...>: route -> plan (counting sort by expert) -> expert banks on grouped
/// rows -> weighted combine in slot order. Dropless; results are bitwise identical for any thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <tuple>
#include <type_traits>

#include "concepts.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
#include "kernels/arch.hpp"
#include "kernels/simd/scatter_add.hpp"
#include "moe_config.hpp"
#include "random.hpp"
#include "routing_plan.hpp"
#include "workspace.hpp"

namespace moe {

/// What a forward pass chose. Views into the Workspace it ran with: valid until that Workspace's next use.
template <class T>
struct ForwardResult {
  Index n_tokens = 0;
  Index top_k = 0;
  std::span<const Index> expert_ids;         ///< (n_tokens, top_k) expert of each slot
  std::span<const T> expert_weights;         ///< (n_tokens, top_k) combine weight of each slot
  std::span<const Index> tokens_per_expert;  ///< (n_experts,) slots routed to each expert
};

/// A sparse Mixture-of-Experts layer.
/// @tparam R     router policy (moe::Router), e.g. routers::TopKSoftmax
/// @tparam Banks expert banks (moe::ExpertBank), e.g. experts::SwiGLU; expert ids are contiguous per bank,
///               in pack order
///
/// Threading: `forward(x, y, ws)` is const; concurrent calls are safe with one Workspace per caller.
template <class R, class... Banks>
class MoELayer {
  static_assert(moe::Router<R>,
                "MoELayer<R, Banks...>: R must model moe::Router: R::Scalar (float or double), d_model(), "
                "n_experts(), top_k() and route(x, ids, weights, arena) const; see include/moe/concepts.hpp");
  static_assert(sizeof...(Banks) >= 1, "MoELayer<R, Banks...>: give at least one expert bank");
  static_assert((ExpertBank<Banks> && ...),
                "MoELayer<R, Banks...>: every bank must model moe::ExpertBank: B::Scalar, d_model(), n_experts() "
                "and forward(xs, offsets, ys, arena) const; see include/moe/concepts.hpp");
  static_assert((std::is_same_v<typename R::Scalar, typename Banks::Scalar> && ...),
                "MoELayer<R, Banks...>: the router and every bank must share one Scalar type");

 public:
  using Scalar = typename R::Scalar;
  using RouterType = R;

  /// Builds the router and the bank from one config (single-bank layers). Throws moe::Error naming the
  /// bad field of an invalid config.
  explicit MoELayer(const MoEConfig& cfg)
    requires(sizeof...(Banks) == 1 && std::is_constructible_v<R, const MoEConfig&> &&
             (std::is_constructible_v<Banks, const MoEConfig&> && ...))
      : MoELayer(R(cfg.validated()), Banks(cfg)...) {}

  /// Composes a router with banks; throws moe::Error when their shapes disagree.
  MoELayer(R router, Banks... banks) : router_(std::move(router)), banks_(std::move(banks)...) {
    Index n_total = 0;
    std::apply(
        [&](const auto&... b) {
          ((detail::require(b.d_model() == router_.d_model(), "moe::MoELayer: an expert bank has d_model = ",
                            b.d_model(), " but the router has d_model = ", router_.d_model()),
            n_total += b.n_experts()),
           ...);
        },
        banks_);
    detail::require(n_total == router_.n_experts(), "moe::MoELayer: the banks hold ", n_total,
                    " experts but the router routes over n_experts = ", router_.n_experts());
    detail::require(router_.top_k() >= 1 && router_.top_k() <= n_total, "moe::MoELayer: top_k = ",
                    router_.top_k(), " must be in [1, n_experts = ", n_total, "]");
  }

  Index d_model() const { return router_.d_model(); }      ///< token width
  Index n_experts() const { return router_.n_experts(); }  ///< experts over all banks
  Index top_k() const { return router_.top_k(); }          ///< slots per token

  const R& router() const { return router_; }  ///< the router policy
  R& router() { return router_; }              ///< the router policy
  /// The I-th expert bank.
  template <std::size_t I>
  const auto& bank() const {
    return std::get<I>(banks_);
  }
  template <std::size_t I>
  auto& bank() {
    return std::get<I>(banks_);
  }

  /// Initialises the router and every bank from one seed (reproducible).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    router_.init(rng);
    std::apply([&](auto&... b) { (b.init(rng), ...); }, banks_);
  }

  /// Bytes of scratch a forward over n_tokens needs: what forward reserves in its Workspace.
  std::size_t workspace_bytes(Index n_tokens) const {
    Arena measure;
    run(ConstMatrixView<Scalar>::shape_only(n_tokens, d_model()), MatrixView<Scalar>(), measure);
    return measure.peak();
  }

  /// y = MoE(x), x and y (n_tokens, d_model). y may be x itself: every read of x happens before y is written.
  /// Grows `ws` on the first call at a size; later calls at the same or a smaller n_tokens do not allocate.
  /// Throws moe::Error, before writing anything, when a shape is wrong or x holds NaN or ±inf.
  /// n_tokens == 0 returns at once with an empty result.
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Workspace& ws) const {
    check_input(x, y);
    if (x.rows() == 0) return {};
    ws.reserve(workspace_bytes(x.rows()));
    Arena arena(ws);
    return run(x, y, arena);
  }

  /// As above with a Workspace owned by the layer (so this overload is not const).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) { return forward(x, y, ws_); }

 private:
  void check_input(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) const {
    detail::require(x.cols() == d_model(), "moe::MoELayer::forward: x is (", x.rows(), ", ", x.cols(),
                    ") but d_model = ", d_model());
    detail::require(y.rows() == x.rows() && y.cols() == d_model(), "moe::MoELayer::forward: y is (", y.rows(),
                    ", ", y.cols(), "), expected (", x.rows(), ", ", d_model(), ")");
    for (Index t = 0; t < x.rows(); ++t) {
      const Scalar* row = x.row(t);
      // x * 0 is 0 for finite x and NaN for NaN or ±inf: one vectorisable sum per row finds a bad row,
      // and only then is the row searched for the element to name.
      Scalar acc = 0;
      for (Index j = 0; j < x.cols(); ++j) acc += row[j] * Scalar(0);
      if (acc == Scalar(0)) continue;
      for (Index j = 0; j < x.cols(); ++j)
        detail::require(std::isfinite(row[j]), "moe::MoELayer::forward: x(", t, ", ", j, ") = ", row[j],
                        "; the layer rejects NaN and ±inf input");
    }
  }

  // The one code path for sizing (measuring arena: every stage takes its scratch and returns) and for
  // running, so workspace_bytes() and forward() cannot disagree.
  ForwardResult<Scalar> run(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Arena& arena) const {
    const Index n_tokens = x.rows(), k = top_k(), d = d_model(), n_slots = n_tokens * k;
    Index* ids = arena.take<Index>(n_slots);        // (n_tokens, top_k)
    Scalar* weights = arena.take<Scalar>(n_slots);  // (n_tokens, top_k)
    RoutingPlan plan = RoutingPlan::carve(arena, n_tokens, k, n_experts());
    Scalar* xs = arena.take<Scalar>(n_slots * d);   // (n_slots, d_model) token rows grouped by expert
    Scalar* ys = arena.take<Scalar>(n_slots * d);   // (n_slots, d_model) expert outputs, same order
    const std::size_t mark = arena.used();          // router and banks run in turn: they share the rest

    router_.route(x, ids, weights, arena);
    arena.rewind(mark);
    const bool measuring = arena.measuring();
    if (!measuring) plan.build(ids);

    const Index n_rows = measuring ? n_slots : plan.n_rows();
    const auto xs_view = measuring ? MatrixView<Scalar>::shape_only(n_rows, d) : MatrixView<Scalar>(xs, n_rows, d);
    const auto ys_view = measuring ? MatrixView<Scalar>::shape_only(n_rows, d) : MatrixView<Scalar>(ys, n_rows, d);
    if (!measuring) {
      // Gather: activations are small next to the weights, and contiguous rows feed the kernels directly.
      MOE_OMP(omp parallel for schedule(static))
      for (Index r = 0; r < n_rows; ++r) std::copy_n(x.row(plan.row_token[r]), d, xs_view.row(r));
    }
    Index first = 0;  // first expert id of the current bank
    std::apply(
        [&](const auto&... bank) {
          ((bank.forward(xs_view, measuring ? nullptr : plan.offsets + first, ys_view, arena),
            arena.rewind(mark), first += bank.n_experts()),
           ...);
        },
        banks_);
    if (measuring) return {};

    // Combine: y[t] = sum over slots s, in slot order, of w[t, s] * ys[slot_row[t, s]].
    MOE_OMP(omp parallel for schedule(static))
    for (Index t = 0; t < n_tokens; ++t) {
      std::fill_n(y.row(t), d, Scalar(0));
      kernels::scatter_add(kernels::default_arch{}, y.middle_rows(t, 1), ConstMatrixView<Scalar>(ys_view),
                           plan.slot_row + t * k, weights + t * k, k);
    }
    return {n_tokens, k, {ids, static_cast<std::size_t>(n_slots)}, {weights, static_cast<std::size_t>(n_slots)},
            {plan.counts, static_cast<std::size_t>(n_experts())}};
  }

  R router_;
  std::tuple<Banks...> banks_;
  Workspace ws_;  // used by the non-const forward overload only
};

}  // namespace moe
