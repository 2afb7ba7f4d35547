#pragma once
/// @file dense_layer.hpp
/// @brief DenseLayer<Bank>: a dense MLP block, y = Bank(x) for every token, built from an always-on bank
/// (moe::SharedBank, e.g. experts::Shared<experts::SwiGLU<T>> with one expert): the first dense layers of
/// DeepSeek-V2/V3 (first_k_dense_replace), or any FFN block of a model of mixed layers (moe::Model). Its surface
/// is MoELayer's where that makes sense: forward(x, y, ws) const, a training forward that records a context,
/// backward(dy, dx, ctx), init(seed), visit_parameters, visit_state, zero_grad.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "concepts.hpp"
#include "config.hpp"
#include "error.hpp"
#include "moe_layer.hpp"
#include "random.hpp"
#include "workspace.hpp"

namespace moe {

template <class Bank>
class DenseLayer;

/// What a DenseLayer's training forward records for its backward: a copy of x and the version() of every
/// parameter (backward refuses weights written since). Caller-owned, reusable (its memory grows like a
/// Workspace); one per forward in flight. The dense counterpart of TrainingContext.
template <class T>
class DenseContext {
 public:
  /// Tokens of the recorded forward (-1 before any).
  Index n_tokens() const { return n_tokens_; }
  /// TrainingContext's global-batch counts, for a uniform surface: a dense layer has no balance loss, so they
  /// stay empty.
  GlobalBatchCounts& global_batch() { return global_batch_; }

 private:
  template <class Bank>
  friend class DenseLayer;
  Workspace forward_ws_;                 // the copy of x (first), then the bank's forward scratch
  Workspace backward_ws_;                // the bank's backward scratch
  const T* x_ = nullptr;                 // (n_tokens, d_model) the copy of x, in forward_ws_
  std::vector<std::uint64_t> versions_;  // version() of every parameter at the forward, in visit order
  Index n_tokens_ = -1;
  const void* layer_ = nullptr;  // the layer that recorded it
  GlobalBatchCounts global_batch_;
};

/// A dense (not routed) MLP block: every token goes through the bank, y = Bank(x). No router, no routing,
/// no auxiliary loss: the forward's ForwardResult carries only n_tokens.
/// @tparam Bank an always-on bank (moe::SharedBank; moe::TrainableSharedBank to train), e.g.
///              experts::Shared<experts::SwiGLU<T>> with n_experts = 1: one SwiGLU MLP of width d_ff
///
/// Threading as MoELayer: forward(x, y, ws) is const (one Workspace per concurrent caller), so are training
/// forwards with one DenseContext each; backward accumulates into the layer's gradients (one at a time).
template <class Bank>
class DenseLayer {
  static_assert(SharedBank<Bank>,
                "DenseLayer<Bank>: Bank must model moe::SharedBank: B::Scalar (float or double), d_model(), "
                "n_experts() and forward(x, y, arena) const over all tokens (e.g. experts::Shared<SwiGLU<T>>); see "
                "include/moe/concepts.hpp");

 public:
  using Scalar = typename Bank::Scalar;
  using BankType = Bank;
  using Context = DenseContext<Scalar>;  ///< what the training forward records (moe::Model reads this)

  /// Builds the bank from a config (e.g. {.d_model = d, .d_ff = ff, .n_experts = 1, .top_k = 1} for one MLP).
  explicit DenseLayer(const MoEConfig& cfg) requires std::is_constructible_v<Bank, const MoEConfig&>
      : DenseLayer(Bank(cfg)) {}
  /// Wraps a bank built with its own options.
  explicit DenseLayer(Bank bank) : bank_(std::move(bank)) {
    detail::require(bank_.d_model() >= 1, "moe::DenseLayer: the bank has d_model = ", bank_.d_model(),
                    ", expected >= 1");
  }

  Index d_model() const { return bank_.d_model(); }  ///< token width
  const Bank& bank() const { return bank_; }         ///< the bank
  Bank& bank() { return bank_; }                     ///< the bank

  /// Initialises the bank from one seed (reproducible).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    bank_.init(rng);
  }

  /// Bytes of scratch a forward over n_tokens needs (what forward reserves in its Workspace). Throws
  /// moe::Error when n_tokens < 0 or the workspace would exceed PTRDIFF_MAX bytes.
  std::size_t workspace_bytes(Index n_tokens) const {
    detail::check_token_bound("moe::DenseLayer", n_tokens, [&] { return workspace_bytes(1); });
    Arena measure;
    run(ConstMatrixView<Scalar>::shape_only(n_tokens, d_model()), MatrixView<Scalar>(), measure, false);
    return measure.peak();
  }

  /// y = Bank(x), x and y (n_tokens, d_model). y may be x itself. Grows `ws` on the first call at a size; later
  /// calls at the same or a smaller n_tokens do not allocate. Throws moe::Error, before writing anything, when
  /// a shape is wrong or x holds NaN or ±inf. The result has n_tokens and nothing else (no routing, no loss).
  /// `sequence_starts` is accepted for MoELayer's surface (a Model passes it to every layer) and unused: a dense
  /// block treats every token alone.
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Workspace& ws,
                                std::span<const Index> /*sequence_starts*/ = {}) const {
    check_input(x, y);
    if (x.rows() == 0) return {};
    ws.reserve(workspace_bytes(x.rows()));
    Arena arena(ws);
    run(x, y, arena, false);
    return tokens_only(x.rows());
  }

  /// As above with a Workspace owned by the layer (so this overload is not const).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) { return forward(x, y, ws_); }

  /// Training forward: as forward(), and records in `ctx` what backward() needs (x is copied).
  ForwardResult<Scalar> forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Context& ctx,
                                std::span<const Index> /*sequence_starts*/ = {}) const {
    check_input(x, y);
    ctx.layer_ = this;
    ctx.n_tokens_ = x.rows();
    ctx.x_ = nullptr;
    if (x.rows() == 0) return {};  // backward on 0 tokens reads no weight: no versions to record
    record_versions(ctx);
    ctx.forward_ws_.reserve(workspace_bytes(x.rows()));
    Arena arena(ctx.forward_ws_);
    ctx.x_ = run(x, y, arena, true);
    return tokens_only(x.rows());
  }

  /// Backward of the training forward recorded in `ctx`: from dy = dL/dy (n_tokens, d_model) writes dx = dL/dx
  /// and ADDS the parameters' gradients to their grad() buffers. dx may be dy itself; repeating backward on one
  /// ctx is allowed. Throws moe::Error, before writing anything, when ctx was not recorded by this layer, a
  /// shape is wrong, dy holds NaN or ±inf, or a parameter was written since that forward (named as
  /// visit_parameters names it; see MoELayer::backward).
  void backward(ConstMatrixView<Scalar> dy, MatrixView<Scalar> dx, Context& ctx) requires TrainableSharedBank<Bank> {
    detail::require(ctx.layer_ == this,
                    "moe::DenseLayer::backward: the DenseContext was not recorded by a "
                    "training forward of this layer");
    detail::require(dy.rows() == ctx.n_tokens_ && dy.cols() == d_model(), "moe::DenseLayer::backward: dy is (",
                    dy.rows(), ", ", dy.cols(), "), expected (", ctx.n_tokens_, ", ", d_model(), ")");
    detail::require(dx.rows() == dy.rows() && dx.cols() == d_model(), "moe::DenseLayer::backward: dx is (", dx.rows(),
                    ", ", dx.cols(), "), expected (", dy.rows(), ", ", d_model(), ")");
    detail::require_finite_rows(dy, "moe::DenseLayer::backward: dy");
    if (dy.rows() == 0) return;
    if (const std::string name = modified_parameter(ctx); !name.empty())
      throw Error(detail::stale_backward_message("moe::DenseLayer::backward", name));
    const Index n = dy.rows(), d = d_model();
    ctx.backward_ws_.reserve(backward_bytes(n));
    Arena arena(ctx.backward_ws_);
    Scalar* dy_copy = arena.take<Scalar>(n * d);  // (n_tokens, d_model) dy, when dx overlaps it
    const std::size_t mark = arena.used();
    ConstMatrixView<Scalar> grad = dy;
    if (overlap(dy, dx)) {
      for (Index t = 0; t < n; ++t) std::copy_n(dy.row(t), d, dy_copy + t * d);
      grad = ConstMatrixView<Scalar>(dy_copy, n, d);
    }
    bank_.backward(ConstMatrixView<Scalar>(ctx.x_, n, d), grad, dx, arena);
    arena.rewind(mark);
    // A bank's backward may read weights through non-const accessors; the values are the forward's still.
    record_versions(ctx);
  }

  /// The name (as visit_parameters gives it) of the first parameter whose version() advanced since the training
  /// forward that recorded `ctx`, or "" when none did: what backward() checks before writing anything.
  /// Throws moe::Error when ctx was not recorded by this layer.
  std::string modified_parameter(const Context& ctx) const requires TrainableSharedBank<Bank> {
    detail::require(ctx.layer_ == this,
                    "moe::DenseLayer::modified_parameter: the DenseContext was not recorded "
                    "by a training forward of this layer");
    return detail::first_modified_parameter(*this, ctx.versions_, [&](auto&& g) { for_each_parameter(g); });
  }

  /// Calls f(name, Parameter&) for every parameter: "bank0.<the bank's name>" (as MoELayer names its banks).
  template <class F>
  void visit_parameters(F&& f) requires TrainableSharedBank<Bank> {
    bank_.visit_parameters([&](std::string_view name, auto& p) { f("bank0." + std::string(name), p); });
  }

  /// Calls f(name, values) for every state buffer of the bank, named as visit_parameters names parameters.
  template <class F>
  void visit_state(F&& f) requires TrainableSharedBank<Bank> {
    bank_.visit_state([&](std::string_view name, auto values) { f("bank0." + std::string(name), values); });
  }

  /// Sets every parameter gradient to zero.
  void zero_grad() requires TrainableSharedBank<Bank> {
    visit_parameters([](const std::string&, auto& p) { p.zero_grad(); });
  }

 private:
  // The one code path for sizing (measuring arena) and running. Carves (n_tokens, d_model) for a copy of x
  // first: kept for backward in training (returned), used in inference only when y overlaps x.
  const Scalar* run(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Arena& arena, bool keep_x) const {
    const Index n = x.rows(), d = d_model();
    Scalar* copy = arena.take<Scalar>(n * d);
    const std::size_t mark = arena.used();
    if (arena.measuring()) {
      bank_.forward(x, MatrixView<Scalar>::shape_only(n, d), arena);
      return nullptr;
    }
    ConstMatrixView<Scalar> in = x;
    if (keep_x || overlap(x, y)) {
      for (Index t = 0; t < n; ++t) std::copy_n(x.row(t), d, copy + t * d);
      in = ConstMatrixView<Scalar>(copy, n, d);
    }
    bank_.forward(in, y, arena);
    arena.rewind(mark);
    return copy;
  }

  // The result of a dense forward: n_tokens, no routing, no loss.
  static ForwardResult<Scalar> tokens_only(Index n_tokens) {
    ForwardResult<Scalar> r;
    r.n_tokens = n_tokens;
    return r;
  }

  std::size_t backward_bytes(Index n_tokens) {
    detail::check_token_bound("moe::DenseLayer", n_tokens, [&] { return backward_bytes(1); });
    Arena measure;
    const auto shape = MatrixView<Scalar>::shape_only(n_tokens, d_model());
    measure.take<Scalar>(n_tokens * d_model());
    bank_.backward(shape, shape, shape, measure);
    return measure.peak();
  }

  // Whether the memory of two views intersects (std::less: a total order on pointers).
  static bool overlap(ConstMatrixView<Scalar> a, ConstMatrixView<Scalar> b) {
    if (a.rows() == 0 || b.rows() == 0 || a.cols() == 0 || b.cols() == 0) return false;
    const Scalar* a_end = a.row(a.rows() - 1) + a.cols();
    const Scalar* b_end = b.row(b.rows() - 1) + b.cols();
    const std::less<const Scalar*> less;
    return less(a.data(), b_end) && less(b.data(), a_end);
  }

  void check_input(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) const {
    detail::require(x.cols() == d_model(), "moe::DenseLayer::forward: x is (", x.rows(), ", ", x.cols(),
                    ") but d_model = ", d_model());
    detail::require(y.rows() == x.rows() && y.cols() == d_model(), "moe::DenseLayer::forward: y is (", y.rows(), ", ",
                    y.cols(), "), expected (", x.rows(), ", ", d_model(), ")");
    detail::require_finite_rows(x, "moe::DenseLayer::forward: x");
  }

  // Calls f(const Parameter&) for every parameter in visit_parameters order, building no name.
  template <class F>
  void for_each_parameter(F&& f) const {
    const_cast<Bank&>(bank_).visit_parameters([&](std::string_view, const auto& p) { f(p); });
  }

  void record_versions(Context& ctx) const requires TrainableSharedBank<Bank> {
    ctx.versions_.clear();
    for_each_parameter([&](const auto& p) { ctx.versions_.push_back(p.version()); });
  }
  void record_versions(Context&) const {}

  Bank bank_;
  Workspace ws_;  // used by the non-const forward overload only
};

}  // namespace moe
