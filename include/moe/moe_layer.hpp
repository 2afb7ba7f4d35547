#pragma once
/// @file moe_layer.hpp
/// @brief MoELayer<Router, Banks...>: route -> plan (counting sort by expert) -> expert banks on grouped
/// rows -> weighted combine in slot order. Dropless; results are bitwise identical for any thread count.

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "concepts.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
#include "kernels/arch.hpp"
#include "kernels/simd/scatter_add.hpp"
#include "moe_config.hpp"
#include "random.hpp"
#include "route_io.hpp"
#include "routing_plan.hpp"
#include "workspace.hpp"

namespace moe {

namespace detail {
/// The error of a backward whose parameter `name` was written after the training forward it would run on.
inline std::string stale_backward_message(const char* who, const std::string& name) {
  return std::string(who) + ": parameter " + name +
         " was modified after the training forward that recorded this context (its version() advanced: an "
         "optimizer step, a load, or any access through a non-const accessor): the recorded activations belong to "
         "the old weights and the gradients would be those of neither model. Run the training forward again (an "
         "optimizer step goes after backward); read weights between forward and backward through a const "
         "reference (std::as_const)";
}

/// The name (as layer.visit_parameters gives it) of the first parameter, in visit order, whose version() differs
/// from `versions` (recorded by a training forward), or "": for_each_parameter(g) calls g(const Parameter&) in
/// that order without allocating; only a found name allocates.
template <class Layer, class ForEach>
std::string first_modified_parameter(const Layer& layer, const std::vector<std::uint64_t>& versions,
                                     ForEach&& for_each_parameter) {
  constexpr std::size_t none = static_cast<std::size_t>(-1);
  std::size_t i = 0, changed = none;
  for_each_parameter([&](const auto& p) {
    if (changed == none && (i >= versions.size() || p.version() != versions[i])) changed = i;
    ++i;
  });
  if (changed == none) return {};
  std::string name;
  i = 0;
  const_cast<Layer&>(layer).visit_parameters([&](const std::string& n, const auto&) {  // names only: no write
    if (i++ == changed) name = n;
  });
  return name;
}

/// Throws moe::Error naming `what`(t, j) and its value at the first NaN or ±inf of m. v · 0 is 0 for finite v and
/// NaN otherwise, so one vectorisable sum per row finds a bad row; only then is the row searched.
template <class T>
void require_finite_rows(ConstMatrixView<T> m, const char* what) {
  for (Index t = 0; t < m.rows(); ++t) {
    const T* row = m.row(t);
    T acc = 0;
    for (Index j = 0; j < m.cols(); ++j) acc += row[j] * T(0);
    if (acc == T(0)) continue;
    for (Index j = 0; j < m.cols(); ++j)
      require(std::isfinite(row[j]), what, "(", t, ", ", j, ") = ", row[j], "; the layer rejects NaN and ±inf");
  }
}

/// The workspace of n_tokens must fit in PTRDIFF_MAX bytes. Every buffer a layer carves grows at most linearly
/// with n_tokens (its size is a product of n_tokens and the layer's shape, or less), so n_tokens times the peak of
/// one token, doubled for alignment and fixed-size pieces, bounds each of them and each Index product that sizes
/// one: checked here (moe::Error naming `who`), before any of those products is formed.
template <class OneToken>
void check_token_bound(const char* who, Index n_tokens, OneToken&& one_token_bytes) {
  require(n_tokens >= 0, who, ": n_tokens = ", n_tokens, " must be >= 0");
  if (n_tokens <= 1) return;
  checked_size<std::byte>(who, "the workspace bound 2 * n_tokens * (bytes of one token)",
                          {2, n_tokens, static_cast<Index>(one_token_bytes())});
}
}  // namespace detail

/// What a forward pass chose. Views into the Workspace it ran with: valid until that Workspace's next use.
template <class T>
struct ForwardResult {
  Index n_tokens = 0;
  Index top_k = 0;
  std::span<const Index> expert_ids;         ///< (n_tokens, top_k) expert of each slot, -1 if unused
  std::span<const T> expert_weights;         ///< (n_tokens, top_k) combine weight of each slot
  std::span<const Index> tokens_per_expert;  ///< (n_experts,) slots routed to each expert
  std::span<const Index> experts_per_token;  ///< (n_tokens,) slots of each token that reached an expert
  Index dropped_slots = 0;                   ///< slots a capacity-limited router dropped in this batch
  /// Auxiliary losses of a router with loss policies (routers::WithLosses), coefficients included, in the
  /// policies' order; aux_loss is their sum (0 without losses). Add it to the task loss: backward already
  /// applies its gradient.
  std::array<double, k_max_losses> aux_losses{};
  Index n_aux_losses = 0;  ///< entries of aux_losses in use
  double aux_loss = 0;     ///< sum of aux_losses
};

/// What a layer of a stack exchanges with its neighbours in a forward (moe::Stack fills it; a lone layer needs
/// none). Every view is optional (empty: none).
template <class T>
struct LayerLinks {
  /// (n_tokens, d_model) the rows the router reads instead of x (pre-gating: moe::Stack routes layer l+1 on
  /// layer l's input); x still feeds the experts.
  ConstMatrixView<T> router_input{};
  /// (n_tokens, n_experts) the previous layer's gate logits, for a router that reads them (links_logits<R>:
  /// MoE++'s gating residual); copied by a training forward.
  ConstMatrixView<T> previous_logits{};
  /// (n_tokens, n_experts) where such a router writes this layer's gate logits for the next layer.
  MatrixView<T> logits{};
};

/// The gradients of LayerLinks in a backward.
template <class T>
struct LayerLinkGradients {
  MatrixView<T> d_router_input{};  ///< out, WRITTEN: dL/d(router_input); required when the forward had a router_input
  ConstMatrixView<T> d_logits{};   ///< in: dL/d(logits) from the next layer, or empty
  MatrixView<T> d_previous_logits{};  ///< out, ADDED: dL/d(previous_logits), or empty: dropped
};

/// What a training forward records for backward: the routing, the grouped rows, the expert outputs, a copy
/// of x and the version() of every parameter (backward refuses weights written since). Caller-owned,
/// reusable (its memory grows like a Workspace); one per forward in flight.
template <class T>
class TrainingContext {
 public:
  /// Tokens of the recorded forward (-1 before any).
  Index n_tokens() const { return n_tokens_; }
  /// The global-batch counts the training forwards with this context read and advance (losses::GlobalBatchLoss):
  /// state the caller owns, one per context, so concurrent training forwards share nothing. Reset them once
  /// per optimizer step; set `recomputing` while re-running counted micro-batches.
  GlobalBatchCounts& global_batch() { return global_batch_; }
  const GlobalBatchCounts& global_batch() const { return global_batch_; }

 private:
  template <class R, class... Banks>
  friend class MoELayer;
  struct Record {
    // The route's output (ids, weights and the router's Saved block) is carved first from the forward's
    // workspace, so backward carves it again at the same place (carve_route_output) with the router's type.
    Index* ids = nullptr;  // (n_tokens, top_k)
    T* weights = nullptr;  // (n_tokens, top_k)
    RoutingPlan plan;
    T* xs = nullptr;  // (n_slots, d_model) grouped rows
    T* ys = nullptr;  // (n_slots, d_model) expert outputs
    T* x = nullptr;   // (n_tokens, d_model) copy of the input
    T* x_route = nullptr;  // (n_tokens, d_model) copy of a separate router input (pre-gating), or nullptr
    T* previous_logits = nullptr;        // (n_tokens, n_experts) copy of LayerLinks::previous_logits, or nullptr
    Index* prev_rows = nullptr;          // (n_slots) previous grouped row of a recurrent bank's row, or -1
    Index* sequence_of_token = nullptr;  // (n_tokens) sequence of each token (each token alone without sequences)
    Index n_sequences = 0;
    bool sequences = false;              // prev_rows holds carried-state links
    Index dropped_slots = 0;             // the route's reports
    std::array<double, k_max_losses> losses{};
    Index n_losses = 0;
  };
  Workspace forward_ws_;
  Workspace backward_ws_;
  Record record_;
  std::vector<std::uint64_t> versions_;  // version() of every parameter at the forward, in visit order
  GlobalBatchCounts global_batch_;
  Index n_tokens_ = -1;
  const void* layer_ = nullptr;  // the layer that recorded it
};

/// A sparse Mixture-of-Experts layer.
/// @tparam R     router policy (moe::Router), e.g. routers::TopKSoftmax
/// @tparam Banks expert banks: routed ones (moe::ExpertBank, e.g. experts::SwiGLU; expert ids are contiguous
///               per bank, in pack order) and always-on ones (moe::SharedBank, e.g. experts::Shared<...>:
///               every token goes through them and their output is added; they take no routed ids)
///
/// Threading: `forward(x, y, ws)` is const; concurrent calls are safe with one Workspace per caller, and so
/// are concurrent training forwards with one TrainingContext each (losses::GlobalBatchLoss too: its counts live
/// in the context). backward() is not: it accumulates into the layer's own gradient buffers,
/// so run the backwards of concurrent forwards one after another, or give each thread its own layer
/// (tests/concurrency_test.cpp, RELIABILITY.md T1/T2).
template <class R, class... Banks>
class MoELayer {
  static_assert(moe::Router<R>,
                "MoELayer<R, Banks...>: R must model moe::Router: R::Scalar (float or double), R::Saved and "
                "carve_saved(arena, n_tokens), d_model(), n_experts(), top_k() and route(RouteInput, RouteOutput, "
                "arena) const; see include/moe/concepts.hpp");
  static_assert(sizeof...(Banks) >= 1, "MoELayer<R, Banks...>: give at least one expert bank");
  static_assert(((ExpertBank<Banks> || SharedBank<Banks>) && ...),
                "MoELayer<R, Banks...>: every bank must model moe::ExpertBank: B::Scalar, d_model(), n_experts() "
                "and forward(xs, offsets, ys, arena) const (or moe::SharedBank); see include/moe/concepts.hpp");
  static_assert((ExpertBank<Banks> || ...), "MoELayer<R, Banks...>: give at least one routed expert bank");
  static_assert((std::is_same_v<typename R::Scalar, typename Banks::Scalar> && ...),
                "MoELayer<R, Banks...>: the router and every bank must share one Scalar type");

 public:
  using Scalar = typename R::Scalar;
  using RouterType = R;
  using Context = TrainingContext<Scalar>;                  ///< what a training forward records
  static constexpr std::size_t n_banks = sizeof...(Banks);  ///< expert banks (routed and shared)

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
            n_total += routed<decltype(b)> ? b.n_experts() : 0),
           ...);
        },
        banks_);
    detail::require(n_total == router_.n_experts(), "moe::MoELayer: the routed banks hold ", n_total,
                    " experts but the router routes over n_experts = ", router_.n_experts());
    // The router bounds top_k itself: null-expert routers (AdaMoE) may use more slots than real experts.
    detail::require(router_.top_k() >= 1, "moe::MoELayer: top_k = ", router_.top_k(), " must be >= 1");
    // Loss policies weight MoE++'s zero-computation experts by their own factor (RouteInput::zero_computation).
    const std::vector<bool> mask = zero_computation_mask();
    if (std::find(mask.begin(), mask.end(), true) != mask.end()) zero_computation_.assign(mask.begin(), mask.end());
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

  /// Per expert id: true for zero-computation experts (banks with `zero_computation = true`, e.g. MoE++'s
  /// zero, copy and constant experts).
  std::vector<bool> zero_computation_mask() const {
    std::vector<bool> mask;
    std::apply(
        [&](const auto&... b) {
          (mask.insert(mask.end(), static_cast<std::size_t>(routed<decltype(b)> ? b.n_experts() : 0),
                       is_zero_computation<std::remove_cvref_t<decltype(b)>>),
           ...);
        },
        banks_);
    return mask;
  }

  /// Initialises the router and every bank from one seed (reproducible).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    router_.init(rng);
    std::apply([&](auto&... b) { (b.init(rng), ...); }, banks_);
  }

  /// Bytes of scratch a forward over n_tokens needs: what forward reserves in its Workspace. Throws moe::Error
  /// when n_tokens < 0 or the workspace would exceed PTRDIFF_MAX bytes (see forward_bytes).
  std::size_t workspace_bytes(Index n_tokens) const { return forward_bytes(n_tokens, false, {}); }

  /// y = MoE(x), x and y (n_tokens, d_model). y may be x itself: every read of x happens before y is written.
  /// Grows `ws` on the first call at a size; later calls at the same or a smaller n_tokens do not allocate.
  /// Throws moe::Error, before writing anything, when a shape is wrong or x holds NaN or ±inf.
  /// n_tokens == 0 returns at once with an empty result.
  ///
  /// `sequence_starts` (optional) marks where each sequence of a packed batch begins (ascending token
  /// indices, the first 0): recurrent banks (experts::GRU) then carry each expert's state from the same
  /// sequence's previous token routed to it (token-level routing, docs/experts.md); without it every routed
  /// row of a recurrent bank starts from a zero state. Other banks ignore it.
  ///
  /// `links` (optional): what a layer of a stack exchanges with its neighbours (LayerLinks: a separate router
  /// input for pre-gating, the previous layer's logits and where this layer's go, for gating residuals).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Workspace& ws,
                                std::span<const Index> sequence_starts = {},
                                const LayerLinks<Scalar>& links = {}) const {
    check_input(x, y, links);
    check_sequences(sequence_starts, x.rows());
    if (x.rows() == 0) return {};
    ws.reserve(forward_bytes(x.rows(), false, links));
    Arena arena(ws);
    return result(run(x, y, arena, false, sequence_starts, links), x.rows());
  }

  /// As above with a Workspace owned by the layer (so this overload is not const).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) { return forward(x, y, ws_); }

  /// Training forward: as forward(), and records in `ctx` what backward() needs (x, the router input and the
  /// previous logits are copied).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, TrainingContext<Scalar>& ctx,
                                std::span<const Index> sequence_starts = {},
                                const LayerLinks<Scalar>& links = {}) const {
    check_input(x, y, links);
    check_sequences(sequence_starts, x.rows());
    ctx.layer_ = this;
    ctx.n_tokens_ = x.rows();
    ctx.record_ = Record{};
    if (x.rows() == 0) return {};  // backward on 0 tokens reads no weight: no versions to record
    record_versions(ctx);
    ctx.forward_ws_.reserve(forward_bytes(x.rows(), true, links));
    Arena arena(ctx.forward_ws_);
    ctx.record_ = run(x, y, arena, true, sequence_starts, links, &ctx.global_batch_);
    return result(ctx.record_, x.rows());
  }

  /// The routing forward() would choose for x, without running the experts: what a pre-gated stack exposes
  /// one layer early so the caller can prefetch those experts. Views into `ws`, as forward()'s.
  ForwardResult<Scalar> route(ConstMatrixView<Scalar> x, Workspace& ws) const {
    check_input(x, MatrixView<Scalar>::shape_only(x.rows(), d_model()), {});
    if (x.rows() == 0) return {};
    ws.reserve(forward_bytes(x.rows(), false, {}));
    Arena arena(ws);
    return result(run(x, MatrixView<Scalar>(), arena, false, {}, {}, nullptr, true), x.rows());
  }

  /// Backward of the training forward recorded in `ctx`: from dy = dL/dy (n_tokens, d_model) writes
  /// dx = dL/dx and ADDS the parameters' gradients to their grad() buffers (zero_grad() resets them).
  /// Results are bitwise identical for any thread count. Throws moe::Error, before writing anything, when
  /// ctx was not recorded by this layer, a shape is wrong, dy holds NaN or ±inf, or a parameter was written
  /// since that forward (its version() advanced: an optimizer step, a non-const accessor; the error names
  /// it, see modified_parameter()). dx may be dy itself. Repeating backward on one ctx is allowed.
  /// `links` (optional): with a forward that had a `router_input`, its gradient is WRITTEN to
  /// links.d_router_input (required then); a router that passes logits on takes links.d_logits and ADDS to
  /// links.d_previous_logits.
  void backward(ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx, TrainingContext<Scalar>& ctx,
                const LayerLinkGradients<Scalar>& links = {}) requires(TrainableRouter<R> &&
                                                                       ((TrainableBank<Banks> ||
                                                                         TrainableSharedBank<Banks>)&&...)) {
    detail::require(ctx.layer_ == this, "moe::MoELayer::backward: the TrainingContext was not recorded by a "
                                        "training forward of this layer");
    detail::require(dy.rows() == ctx.n_tokens_ && dy.cols() == d_model(), "moe::MoELayer::backward: dy is (",
                    dy.rows(), ", ", dy.cols(), "), expected (", ctx.n_tokens_, ", ", d_model(), ")");
    detail::require(dx.rows() == dy.rows() && dx.cols() == d_model(), "moe::MoELayer::backward: dx is (",
                    dx.rows(), ", ", dx.cols(), "), expected (", dy.rows(), ", ", d_model(), ")");
    const bool separate = ctx.record_.x_route != nullptr;
    const MatrixView<Scalar> d_router_input = links.d_router_input;
    detail::require(!separate || (d_router_input.rows() == dy.rows() && d_router_input.cols() == d_model() &&
                                  d_router_input.data() != nullptr),
                    "moe::MoELayer::backward: the forward had a router_input: give d_router_input (", dy.rows(), ", ",
                    d_model(), ")");
    detail::require_finite_rows(dy, "moe::MoELayer::backward: dy");
    if (dy.rows() == 0) return;
    if (const std::string name = modified_parameter(ctx); !name.empty())
      throw Error(detail::stale_backward_message("moe::MoELayer::backward", name));
    for (const auto& [view, what] : {std::pair{links.d_logits, "d_logits"},
                                     std::pair{ConstMatrixView<Scalar>(links.d_previous_logits), "d_previous_logits"}})
      detail::require(view.data() == nullptr || (view.rows() == dy.rows() && view.cols() == n_experts()),
                      "moe::MoELayer::backward: links.", what, " is (", view.rows(), ", ", view.cols(), "), expected (",
                      dy.rows(), ", ", n_experts(), ")");
    ctx.backward_ws_.reserve(backward_bytes(dy.rows()));
    Arena arena(ctx.backward_ws_);
    Arena recorded(ctx.forward_ws_);  // the route's output, carved again where the forward carved it
    const RouteOutputOf<R> route = carve_route_output(router_, recorded, dy.rows());
    assert(route.ids == ctx.record_.ids && route.weights == ctx.record_.weights);
    run_backward(ctx.record_, route, dy, dx, links, arena);
    // A policy's backward may advance versions by reading weights through non-const accessors; the values
    // are those of the forward still, so a repeated backward on this ctx stays valid.
    record_versions(ctx);
  }

  /// The name (as visit_parameters gives it) of the first parameter whose version() advanced since the
  /// training forward that recorded `ctx` (a write: optimizer step, non-const accessor, load), or "" when
  /// none did: what backward() checks before writing anything. Allocates only to return a name.
  /// Throws moe::Error when ctx was not recorded by this layer.
  std::string modified_parameter(const TrainingContext<Scalar>& ctx) const {
    detail::require(ctx.layer_ == this, "moe::MoELayer::modified_parameter: the TrainingContext was not recorded "
                                        "by a training forward of this layer");
    return detail::first_modified_parameter(*this, ctx.versions_, [&](auto&& g) { for_each_parameter(g); });
  }

  /// Calls f(name, Parameter&) for every parameter: "router.<name>", then "bank<i>.<name>".
  template <class F>
  void visit_parameters(F&& f) {
    router_.visit_parameters([&](std::string_view name, auto& p) { f("router." + std::string(name), p); });
    std::size_t i = 0;
    std::apply(
        [&](auto&... bank) {
          ((bank.visit_parameters(
                [&](std::string_view name, auto& p) { f("bank" + std::to_string(i) + "." + std::string(name), p); }),
            ++i),
           ...);
        },
        banks_);
  }

  /// Calls f(name, values) for every state buffer (moe::StateVisitorArchetype: a selection bias, a frozen LoRA
  /// base), named as visit_parameters names parameters: what a checkpoint needs besides the parameters.
  template <class F>
  void visit_state(F&& f) requires(TrainableRouter<R> && ((TrainableBank<Banks> || TrainableSharedBank<Banks>)&&...)) {
    router_.visit_state([&](std::string_view name, auto values) { f("router." + std::string(name), values); });
    std::size_t i = 0;
    std::apply(
        [&](auto&... bank) {
          ((bank.visit_state([&](std::string_view name, auto values) {
             f("bank" + std::to_string(i) + "." + std::string(name), values);
           }),
            ++i),
           ...);
        },
        banks_);
  }

  /// Sets every parameter gradient to zero.
  void zero_grad() {
    visit_parameters([](const std::string&, auto& p) { p.zero_grad(); });
  }

 private:
  using Record = typename TrainingContext<Scalar>::Record;

  void check_input(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, const LayerLinks<Scalar>& links) const {
    detail::require(x.cols() == d_model(), "moe::MoELayer::forward: x is (", x.rows(), ", ", x.cols(),
                    ") but d_model = ", d_model());
    detail::require(y.rows() == x.rows() && y.cols() == d_model(), "moe::MoELayer::forward: y is (", y.rows(),
                    ", ", y.cols(), "), expected (", x.rows(), ", ", d_model(), ")");
    detail::require_finite_rows(x, "moe::MoELayer::forward: x");
    const auto check_view = [&](ConstMatrixView<Scalar> v, Index cols, const char* what) {
      if (v.data() == nullptr) return;
      detail::require(v.rows() == x.rows() && v.cols() == cols, what, " is (", v.rows(), ", ", v.cols(),
                      "), expected (", x.rows(), ", ", cols, ")");
      detail::require_finite_rows(v, what);
    };
    check_view(links.router_input, d_model(), "moe::MoELayer::forward: links.router_input");
    check_view(links.previous_logits, n_experts(), "moe::MoELayer::forward: links.previous_logits");
    if (links.logits.data() != nullptr)
      detail::require(links.logits.rows() == x.rows() && links.logits.cols() == n_experts(),
                      "moe::MoELayer::forward: links.logits is (", links.logits.rows(), ", ", links.logits.cols(),
                      "), expected (", x.rows(), ", ", n_experts(), ")");
  }

  // Calls f(const Parameter&) for every parameter in visit_parameters order, building no name (no allocation).
  // The policies' visitors are non-const because they hand out Parameter&; f only reads through const&.
  template <class F>
  void for_each_parameter(F&& f) const {
    auto& self = const_cast<MoELayer&>(*this);
    self.router_.visit_parameters([&](std::string_view, const auto& p) { f(p); });
    std::apply([&](auto&... bank) { (bank.visit_parameters([&](std::string_view, const auto& p) { f(p); }), ...); },
               self.banks_);
  }

  // Records every parameter's version() in ctx (its vector grows once: no allocation after the first call).
  void record_versions(TrainingContext<Scalar>& ctx) const {
    ctx.versions_.clear();
    for_each_parameter([&](const auto& p) { ctx.versions_.push_back(p.version()); });
  }

  static void check_sequences(std::span<const Index> starts, Index n_tokens) {
    if (starts.empty()) return;
    detail::require(starts[0] == 0, "moe::MoELayer::forward: sequence_starts[0] = ", starts[0], ", expected 0");
    for (std::size_t i = 1; i < starts.size(); ++i)
      detail::require(starts[i] > starts[i - 1] && starts[i] < n_tokens, "moe::MoELayer::forward: sequence_starts[",
                      i, "] = ", starts[i], " must be above the previous start and below n_tokens = ", n_tokens);
  }

  // Bytes of scratch of a backward over n_tokens (checked like forward_bytes).
  std::size_t backward_bytes(Index n_tokens) {
    detail::check_token_bound("moe::MoELayer", n_tokens, [&] { return backward_bytes(1); });
    Arena measure;
    run_backward(Record{}, RouteOutputOf<R>{}, ConstMatrixView<Scalar>::shape_only(n_tokens, d_model()),
                 MatrixView<Scalar>::shape_only(n_tokens, d_model()), {}, measure);
    return measure.peak();
  }

  // Bytes of scratch of a forward over n_tokens with the given links (only whether each is present matters).
  std::size_t forward_bytes(Index n_tokens, bool training, const LayerLinks<Scalar>& links) const {
    detail::check_token_bound("moe::MoELayer", n_tokens, [&] { return forward_bytes(1, training, links); });
    Arena measure;
    const auto shape = ConstMatrixView<Scalar>::shape_only(n_tokens, d_model());
    // Shape-only views (no data) stand for the links that are present: run() sizes their copies.
    LayerLinks<Scalar> sized;
    if (links.router_input.data() != nullptr) sized.router_input = shape;
    if (links.previous_logits.data() != nullptr)
      sized.previous_logits = ConstMatrixView<Scalar>::shape_only(n_tokens, n_experts());
    run(shape, MatrixView<Scalar>(), measure, training, {}, sized);
    return measure.peak();
  }

  ForwardResult<Scalar> result(const Record& rec, Index n_tokens) const {
    const auto n_slots = static_cast<std::size_t>(n_tokens * top_k());
    ForwardResult<Scalar> r{n_tokens,
                            top_k(),
                            {rec.ids, n_slots},
                            {rec.weights, n_slots},
                            {rec.plan.counts, static_cast<std::size_t>(n_experts())},
                            {rec.plan.experts_per_token, static_cast<std::size_t>(n_tokens)},
                            rec.dropped_slots,
                            rec.losses,
                            rec.n_losses};
    for (Index i = 0; i < r.n_aux_losses; ++i) r.aux_loss += r.aux_losses[static_cast<std::size_t>(i)];
    return r;
  }

  template <class B>
  static constexpr bool routed = ExpertBank<std::remove_cvref_t<B>>;
  static constexpr bool has_shared = (SharedBank<Banks> || ...);
  static constexpr bool has_sequence_bank = (SequenceBank<Banks> || ...);
  // Every routed bank reads its rows from the tokens in place (no gathered copy needed for inference).
  static constexpr bool all_token_indexed = ((TokenIndexedBank<Banks> || !ExpertBank<Banks>) && ...);

  // Calls f(bank) for each always-on bank, in pack order.
  template <class Self, class F>
  static void for_each_shared(Self& self, F&& f) {
    const auto one = [&](auto& bank) {
      if constexpr (!routed<decltype(bank)>) f(bank);
    };
    std::apply([&](auto&... bank) { (one(bank), ...); }, self.banks_);
  }

  // What the router reads in this forward (and its backward): the rows it routes and the batch's layout.
  RouteInput<Scalar> route_input(ConstMatrixView<Scalar> rows, const Record& rec, bool training,
                                 ConstMatrixView<Scalar> previous_logits, GlobalBatchCounts* global_batch) const {
    return {.x = rows,
            .training = training,
            .sequence_of_token = rec.sequences ? rec.sequence_of_token : nullptr,
            .n_sequences = rec.sequences ? rec.n_sequences : 0,
            .previous_logits = previous_logits,
            .zero_computation = zero_computation_,
            .global_batch = global_batch};
  }

  // The one code path for sizing (measuring arena: every stage takes its scratch and returns) and for
  // running, so workspace_bytes() and forward() cannot disagree. `keep_x` also copies x, the router input and
  // the previous logits (training). `global_batch`: the training context's counts, or nullptr. `route_only`: stop
  // after routing (route()).
  Record run(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Arena& arena, bool keep_x,
             std::span<const Index> sequence_starts, const LayerLinks<Scalar>& links,
             GlobalBatchCounts* global_batch = nullptr, bool route_only = false) const {
    const Index n_tokens = x.rows(), k = top_k(), d = d_model(), n_slots = n_tokens * k, E = n_experts();
    Record rec;
    RouteOutputOf<R> route = carve_route_output(router_, arena, n_tokens);  // first: see Record
    route.logits = links.logits;
    rec.ids = route.ids;
    rec.weights = route.weights;
    rec.plan = RoutingPlan::carve(arena, n_tokens, k, n_experts());
    // The grouped copy of x: for backward, and for banks that cannot read the tokens in place.
    const bool gather = keep_x || !all_token_indexed;
    rec.xs = arena.take<Scalar>(gather ? n_slots * d : 0);
    rec.ys = arena.take<Scalar>(n_slots * d);
    if (keep_x) rec.x = arena.take<Scalar>(n_tokens * d);
    // A shape-only view (measuring) stands for a present link: see forward_bytes.
    const auto present = [&](ConstMatrixView<Scalar> v) {
      return v.data() != nullptr || (arena.measuring() && v.rows() > 0);
    };
    const bool separate = present(links.router_input), previous = present(links.previous_logits);
    if (keep_x && separate) rec.x_route = arena.take<Scalar>(n_tokens * d);
    if (keep_x && previous) rec.previous_logits = arena.take<Scalar>(n_tokens * E);
    rec.sequence_of_token = arena.take<Index>(n_tokens);
    rec.prev_rows = arena.take<Index>(n_slots);
    Scalar* shared = arena.take<Scalar>(has_shared ? n_tokens * d : 0);  // (n_tokens, d_model) always-on sum
    const std::size_t mark = arena.used();  // router and banks run in turn: they share the rest
    const bool measuring = arena.measuring();

    rec.sequences = !sequence_starts.empty();
    if (!measuring) {
      rec.n_sequences = rec.sequences ? static_cast<Index>(sequence_starts.size()) : n_tokens;
      for (Index i = 0; i < rec.n_sequences; ++i) {
        const Index begin = rec.sequences ? sequence_starts[static_cast<std::size_t>(i)] : i;
        const Index end = !rec.sequences ? i + 1
                          : i + 1 < rec.n_sequences ? sequence_starts[static_cast<std::size_t>(i + 1)]
                                                    : n_tokens;
        std::fill(rec.sequence_of_token + begin, rec.sequence_of_token + end, i);
      }
    }
    router_.route(route_input(separate ? links.router_input : x, rec, keep_x, links.previous_logits, global_batch),
                  route, arena);
    rec.dropped_slots = route.dropped_slots;
    rec.losses = route.losses;
    rec.n_losses = route.n_losses;
    arena.rewind(mark);
    if (!measuring) {
      rec.plan.build(rec.ids);
      if (route_only) return rec;
      if (rec.sequences && has_sequence_bank) rec.plan.link_sequences(rec.sequence_of_token, rec.prev_rows);
      if (keep_x)
        for (Index t = 0; t < n_tokens; ++t) std::copy_n(x.row(t), d, rec.x + t * d);
      if (rec.x_route != nullptr)
        for (Index t = 0; t < n_tokens; ++t) std::copy_n(links.router_input.row(t), d, rec.x_route + t * d);
      if (rec.previous_logits != nullptr)
        for (Index t = 0; t < n_tokens; ++t) std::copy_n(links.previous_logits.row(t), E, rec.previous_logits + t * E);
    }
    const Index n_rows = measuring ? n_slots : rec.plan.n_rows();
    const auto xs = grouped(rec.xs, n_rows), ys = grouped(rec.ys, n_rows);
    if (!measuring && gather) {
      MOE_OMP(omp parallel for schedule(static) if(double(n_rows) * double(d) >= detail::k_parallel_min_work))
      for (Index r = 0; r < n_rows; ++r) std::copy_n(x.row(rec.plan.row_token[r]), d, xs.row(r));
    }
    for_each_bank(rec.plan, measuring, [&](const auto& bank, const Index* offsets) {
      if constexpr (SequenceBank<std::remove_cvref_t<decltype(bank)>>) {
        bank.forward(xs, offsets, rec.sequences ? rec.prev_rows : nullptr, ys, arena);
      } else if constexpr (TokenIndexedBank<std::remove_cvref_t<decltype(bank)>>) {
        bank.forward_tokens(x, rec.plan.row_token, offsets, ys, arena);
      } else {
        bank.forward(xs, offsets, ys, arena);
      }
      arena.rewind(mark);
    });
    if constexpr (has_shared) {
      // Always-on banks read x before the combine writes y (which may be x), summed in pack order.
      Scalar* one = arena.take<Scalar>(n_tokens * d);  // (n_tokens, d_model) one bank's output
      bool first = true;
      for_each_shared(*this, [&](const auto& bank) {
        const std::size_t inner = arena.used();
        bank.forward(x, grouped(first ? shared : one, n_tokens), arena);
        arena.rewind(inner);
        if (!measuring && !first)
          for (Index i = 0; i < n_tokens * d; ++i) shared[i] += one[i];
        first = false;
      });
      arena.rewind(mark);
    }
    if (measuring) return rec;

    // Combine: y[t] = (always-on output) + sum over slots s, in slot order, of w[t, s] * ys[slot_row[t, s]].
    MOE_OMP(omp parallel for schedule(static) if(double(n_slots) * double(d) >= detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      if constexpr (has_shared) {
        std::copy_n(shared + t * d, d, y.row(t));
      } else {
        std::fill_n(y.row(t), d, Scalar(0));
      }
      kernels::scatter_add(kernels::default_arch{}, y.middle_rows(t, 1), ConstMatrixView<Scalar>(ys),
                           rec.plan.slot_row + t * k, rec.weights + t * k, k);
    }
    return rec;
  }

  // Backward through combine, banks and router; sized like run() with a measuring arena.
  // dx may be dy: every read of dy (the combine's gradient, the always-on banks) happens before dx is written.
  void run_backward(const Record& rec, const RouteOutputOf<R>& route, ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx,
                    const LayerLinkGradients<Scalar>& links, Arena& arena) {
    const Index n_tokens = dy.rows(), k = top_k(), d = d_model(), n_slots = n_tokens * k;
    Scalar* dweights = arena.take<Scalar>(n_slots);  // (n_tokens, top_k) dL/dw
    Scalar* dys = arena.take<Scalar>(n_slots * d);   // (n_slots, d_model) dL/d(expert output)
    Scalar* dxs = arena.take<Scalar>(n_slots * d);   // (n_slots, d_model) dL/d(grouped input)
    Scalar* dshared = arena.take<Scalar>(has_shared ? n_tokens * d : 0);  // (n_tokens, d_model) always-on dL/dx sum
    const std::size_t mark = arena.used();
    const bool measuring = arena.measuring();
    const Index n_rows = measuring ? n_slots : rec.plan.n_rows();
    const auto xs = grouped(rec.xs, n_rows), ys = grouped(rec.ys, n_rows);
    const auto dys_view = grouped(dys, n_rows), dxs_view = grouped(dxs, n_rows);

    if (!measuring) {
      // y[t] = sum_s w[t,s] ys[r]: dL/dw[t,s] = <dy[t], ys[r]> and dL/dys[r] = w[t,s] dy[t].
      MOE_OMP(omp parallel for schedule(static) if(double(n_slots) * double(d) >= detail::k_parallel_min_work))
      for (Index t = 0; t < n_tokens; ++t) {
        for (Index s = 0; s < k; ++s) {
          const Index r = rec.plan.slot_row[t * k + s];
          Scalar dot = 0;
          if (r >= 0) {
            const Scalar w = rec.weights[t * k + s];
            for (Index j = 0; j < d; ++j) {
              dot += dy(t, j) * ys(r, j);
              dys_view(r, j) = w * dy(t, j);
            }
          }
          dweights[t * k + s] = dot;
        }
      }
    }
    const auto x = measuring ? ConstMatrixView<Scalar>::shape_only(n_tokens, d)
                             : ConstMatrixView<Scalar>(rec.x, n_tokens, d);
    if constexpr (has_shared) {
      // Always-on banks read dy now, before dx (which may be dy) is written; their dL/dx summed in pack order.
      Scalar* one = arena.take<Scalar>(n_tokens * d);  // (n_tokens, d_model) one bank's dL/dx
      bool first = true;
      for_each_shared(*this, [&](auto& bank) {
        const std::size_t inner = arena.used();
        bank.backward(x, dy, grouped(first ? dshared : one, n_tokens), arena);
        arena.rewind(inner);
        if (!measuring && !first)
          for (Index i = 0; i < n_tokens * d; ++i) dshared[i] += one[i];
        first = false;
      });
      arena.rewind(mark);
    }
    for_each_bank(rec.plan, measuring, [&](auto& bank, const Index* offsets) {
      if constexpr (SequenceBank<std::remove_cvref_t<decltype(bank)>>) {
        bank.backward(xs, offsets, rec.sequences ? rec.prev_rows : nullptr, dys_view, dxs_view, arena);
      } else {
        bank.backward(xs, offsets, dys_view, dxs_view, arena);
      }
      arena.rewind(mark);
    });
    if (!measuring) {
      // dx[t] = sum over slots, in slot order, of dxs[slot_row[t, s]] (fixed order: deterministic), then the
      // always-on banks' sum.
      MOE_OMP(omp parallel for schedule(static) if(double(n_slots) * double(d) >= detail::k_parallel_min_work))
      for (Index t = 0; t < n_tokens; ++t) {
        std::fill_n(dx.row(t), d, Scalar(0));
        for (Index s = 0; s < k; ++s) {
          const Index r = rec.plan.slot_row[t * k + s];
          if (r >= 0)
            for (Index j = 0; j < d; ++j) dx(t, j) += dxs_view(r, j);
        }
        if constexpr (has_shared)
          for (Index j = 0; j < d; ++j) dx(t, j) += dshared[t * d + j];
      }
    }
    // The router read x, or a separate input whose gradient goes to d_router_input.
    const bool separate = rec.x_route != nullptr;
    const auto xr = separate ? ConstMatrixView<Scalar>(rec.x_route, n_tokens, d) : x;
    const MatrixView<Scalar> dxr = separate ? links.d_router_input : dx;
    if (separate)
      for (Index t = 0; t < n_tokens; ++t) std::fill_n(dxr.row(t), d, Scalar(0));
    const auto previous = rec.previous_logits == nullptr
                              ? ConstMatrixView<Scalar>()
                              : ConstMatrixView<Scalar>(rec.previous_logits, n_tokens, n_experts());
    router_.route_backward(
        route_input(xr, rec, true, previous, nullptr), route,
        {.dweights = dweights, .dlogits = links.d_logits, .dx = dxr, .dprevious_logits = links.d_previous_logits},
        arena);
  }

  // A (rows, d_model) view of a grouped buffer, or only its shape while measuring (p == nullptr).
  MatrixView<Scalar> grouped(Scalar* p, Index rows) const {
    return p == nullptr ? MatrixView<Scalar>::shape_only(rows, d_model()) : MatrixView<Scalar>(p, rows, d_model());
  }

  // Calls f(bank, offsets of its first expert) for each bank in pack order (offsets nullptr while measuring).
  template <class Self, class F>
  static void for_each_bank(Self& self, const RoutingPlan& plan, bool measuring, F&& f) {
    Index first = 0;
    const auto one = [&](auto& bank) {
      if constexpr (routed<decltype(bank)>) {
        f(bank, measuring ? nullptr : plan.offsets + first);
        first += bank.n_experts();
      }
    };
    std::apply([&](auto&... bank) { (one(bank), ...); }, self.banks_);
  }
  template <class F>
  void for_each_bank(const RoutingPlan& plan, bool measuring, F&& f) const {
    for_each_bank(*this, plan, measuring, f);
  }
  template <class F>
  void for_each_bank(const RoutingPlan& plan, bool measuring, F&& f) {
    for_each_bank(*this, plan, measuring, f);
  }

  R router_;
  std::tuple<Banks...> banks_;
  std::vector<std::uint8_t> zero_computation_;  // (n_experts) RouteInput::zero_computation, or empty: none
  Workspace ws_;  // used by the non-const forward overload only
};

}  // namespace moe
