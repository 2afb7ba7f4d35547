#pragma once
/// @file concepts.hpp
/// @brief The contracts of the policies that MoELayer composes. Each concept's comment is the contract;
/// MoELayer turns a failed concept into one static_assert sentence naming what is missing.

#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>

#include "config.hpp"
#include "parameter.hpp"
#include "route_io.hpp"
#include "workspace.hpp"

namespace moe {

/// A floating-point scalar the kernels support.
template <class T>
concept Scalar = std::same_as<T, float> || std::same_as<T, double>;

/// A router scores tokens and chooses, per token, up to `top_k()` slots of (expert id, weight).
///
/// Requires: `R::Scalar`; `R::Saved`, the layout of what its backward needs (pointers into an Arena) and
/// `carve_saved(arena, n_tokens)` const that carves it; `d_model()`, `n_experts()`, `top_k()`; and
/// `route(in, out, arena)` const (RouteInput in, RouteOutput out, see route_io.hpp), which reads in.x
/// (n_tokens, d_model) and writes out.ids (n_tokens, top_k) with distinct experts in [0, n_experts) (or -1 for
/// an unused slot), out.weights (n_tokens, top_k) and out.saved. Scratch comes from `arena` only (it may be a
/// measuring arena that returns nullptr: then the router must only take() what it needs and return), so
/// routing never allocates.
template <class R>
concept Router = Scalar<typename R::Scalar> && std::is_trivially_copyable_v<typename R::Saved> &&
    requires(const R& r, const RouteInput<typename R::Scalar>& in, RouteOutputOf<R>& out, Arena& arena) {
  { r.d_model() } -> std::convertible_to<Index>;
  { r.n_experts() } -> std::convertible_to<Index>;
  { r.top_k() } -> std::convertible_to<Index>;
  { r.carve_saved(arena, Index{}) } -> std::same_as<typename R::Saved>;
  { r.route(in, out, arena) } -> std::same_as<void>;
};

/// What visit_parameters hands each parameter to: f(name, parameter).
template <class T>
struct ParameterVisitorArchetype {
  void operator()(std::string_view, Parameter<T>&) const {}
};

/// What visit_state hands each state buffer to: f(name, values), values a std::span<T> (buffers: a selection
/// bias, a frozen base, optimizer moments) or a std::span<std::int64_t> (counters: an optimizer's step).
/// State is what a model needs besides its parameters to resume exactly; it receives no gradient.
template <class T>
struct StateVisitorArchetype {
  void operator()(std::string_view, std::span<T>) const {}
  void operator()(std::string_view, std::span<std::int64_t>) const {}
};

/// A router that trains: `route_backward(in, out, grad, arena)` takes the forward's input and output and
/// grad.dweights = dL/dweights (n_tokens, top_k), ADDS the input gradient to grad.dx (n_tokens, d_model) and
/// accumulates its parameters' gradients; `visit_parameters(f)` calls f(name, Parameter&) for each, and
/// `visit_state(f)` f(name, values) for each state buffer (StateVisitorArchetype; none: an empty body).
template <class R>
concept TrainableRouter = Router<R> &&
    requires(R& r, const RouteInput<typename R::Scalar>& in, const RouteOutputOf<R>& out,
             const RouteGradient<typename R::Scalar>& grad, Arena& arena) {
  { r.route_backward(in, out, grad, arena) } -> std::same_as<void>;
  r.visit_parameters(ParameterVisitorArchetype<typename R::Scalar>{});
  r.visit_state(StateVisitorArchetype<typename R::Scalar>{});
};

/// A router that exposes what balance losses need (TopKRouter, NullExpertRouter, DenseToSparseGate,
/// GatingResidual): the width of its balance columns; `balance_logits(in, z, arena)`, the logits it routes on;
/// `route_logits(z, out, arena)`, route() from those logits (so the gate runs once); `balance_probabilities(z,
/// s, p)` per token row (its scores s and the probabilities p, Σp = 1); `balance_probabilities_backward(s, p, g,
/// dz)` (g = dL/dp in, clobbered; ADDS dL/dz); `balance_choice(out, n_tokens, cols)`, the column of each slot;
/// and `balance_logits_backward(in, dz, grad, arena)`, which accumulates the gate gradient and ADDS dL/dx to
/// grad.dx (and dL/d(previous logits) to grad.dprevious_logits).
template <class R>
concept BalanceRouter = TrainableRouter<R> &&
    requires(R& r, const R& cr, const RouteInput<typename R::Scalar>& in, MatrixView<typename R::Scalar> z,
             RouteOutputOf<R>& out, const RouteGradient<typename R::Scalar>& grad, typename R::Scalar* p, Index* cols,
             Arena& arena) {
  { cr.balance_width() } -> std::convertible_to<Index>;
  cr.balance_logits(in, z, arena);
  cr.route_logits(z, out, arena);
  cr.balance_probabilities(p, p, p);
  cr.balance_probabilities_backward(p, p, p, p);
  cr.balance_choice(out, Index{}, cols);
  r.balance_logits_backward(in, z, grad, arena);
};

/// A router that routes from logits it is given (TopKRouter; what routers::GatingResidual wraps): a
/// BalanceRouter whose `logits_backward(out, dweights, dz, arena)` WRITES dL/dz (n_tokens, n_experts) of
/// route_logits' weights.
template <class R>
concept LogitsRouter = BalanceRouter<R> &&
    requires(const R& r, const RouteOutputOf<R>& out, const typename R::Scalar* v, MatrixView<typename R::Scalar> dz,
             Arena& arena) {
  r.logits_backward(out, v, dz, arena);
};

/// An expert bank holds `n_experts()` experts of one kind and runs them on rows grouped by expert.
///
/// Requires: `B::Scalar`; `d_model()`, `n_experts()`; and `forward(xs, offsets, ys, arena)` const,
/// where xs, ys are (rows, d_model) grouped by expert and the bank's expert e owns rows
/// [offsets[e], offsets[e+1]). The bank writes every row of ys in its range and may split the work
/// over threads, but each output element must be computed by one thread in a fixed order
/// (results identical for any thread count). Scratch comes from `arena` as for Router.
template <class B>
concept ExpertBank = Scalar<typename B::Scalar> &&
    requires(const B& b, ConstMatrixView<typename B::Scalar> xs, const Index* offsets,
             MatrixView<typename B::Scalar> ys, Arena& arena) {
      { b.d_model() } -> std::convertible_to<Index>;
      { b.n_experts() } -> std::convertible_to<Index>;
      { b.forward(xs, offsets, ys, arena) } -> std::same_as<void>;
    };

/// A recurrent bank (experts::GRU): besides the ExpertBank forward, `forward(xs, offsets, prev_rows, ys, arena)`
/// where prev_rows[r] is the grouped row whose output is row r's starting state (-1: zero state); the layer
/// builds prev_rows from the sequences of a packed batch.
template <class B>
concept SequenceBank = ExpertBank<B> &&
    requires(const B& b, ConstMatrixView<typename B::Scalar> xs, const Index* offsets, const Index* prev_rows,
             MatrixView<typename B::Scalar> ys, Arena& arena) {
      { b.forward(xs, offsets, prev_rows, ys, arena) } -> std::same_as<void>;
    };

/// A bank that reads its grouped rows straight from the tokens (experts::FFN): besides the ExpertBank
/// forward, `forward_tokens(x, row_token, offsets, ys, arena)` with x (n_tokens, d_model) and grouped row r
/// = x[row_token[r]], same results. The layer then skips gathering the rows (inference) and a bank that
/// converts its input (bf16, int8) converts each token once instead of once per routed slot.
template <class B>
concept TokenIndexedBank = ExpertBank<B> &&
    requires(const B& b, ConstMatrixView<typename B::Scalar> x, const Index* row_token, const Index* offsets,
             MatrixView<typename B::Scalar> ys, Arena& arena) {
      { b.forward_tokens(x, row_token, offsets, ys, arena) } -> std::same_as<void>;
    };

/// True for banks that declare `static constexpr bool zero_computation = true` (no matrix product per row).
template <class B>
inline constexpr bool is_zero_computation = requires { requires B::zero_computation; };

/// A bank that trains: `backward(xs, offsets, dys, dxs, arena)` takes the gradient w.r.t. its outputs on
/// the grouped rows, WRITES the input gradient of every row in its range to dxs and accumulates its
/// parameters' gradients (same determinism rule as forward); `visit_parameters(f)` and `visit_state(f)` as for routers.
template <class B>
concept TrainableBank = ExpertBank<B> &&
    requires(B& b, ConstMatrixView<typename B::Scalar> xs, const Index* offsets,
             ConstMatrixView<typename B::Scalar> dys, MatrixView<typename B::Scalar> dxs, Arena& arena) {
      { b.backward(xs, offsets, dys, dxs, arena) } -> std::same_as<void>;
      b.visit_parameters(ParameterVisitorArchetype<typename B::Scalar>{});
      b.visit_state(StateVisitorArchetype<typename B::Scalar>{});
    };

/// An always-on (shared) bank: every token goes through it and its output is added to the routed
/// combine (DeepSeekMoE, Qwen2-MoE). Requires `B::Scalar`, `d_model()`, `n_experts()` (its always-on
/// experts, not routed) and `forward(x, y, arena)` const over all tokens, x and y (n_tokens, d_model),
/// with the same determinism and scratch rules as ExpertBank.
template <class B>
concept SharedBank = Scalar<typename B::Scalar> &&
    requires(const B& b, ConstMatrixView<typename B::Scalar> x, MatrixView<typename B::Scalar> y, Arena& arena) {
      { b.d_model() } -> std::convertible_to<Index>;
      { b.n_experts() } -> std::convertible_to<Index>;
      { b.forward(x, y, arena) } -> std::same_as<void>;
    };

    /// A shared bank that trains: `backward(x, dy, dx, arena)` WRITES dx (n_tokens, d_model) and accumulates its
    /// parameters' gradients; `visit_parameters(f)` and `visit_state(f)` as for routers.
    template <class B>
    concept TrainableSharedBank = SharedBank<B> &&
        requires(B& b, ConstMatrixView<typename B::Scalar> x, MatrixView<typename B::Scalar> dx, Arena& arena) {
      { b.backward(x, x, dx, arena) } -> std::same_as<void>;
      b.visit_parameters(ParameterVisitorArchetype<typename B::Scalar>{});
      b.visit_state(StateVisitorArchetype<typename B::Scalar>{});
    };

}  // namespace moe
