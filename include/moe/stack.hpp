#pragma once
/// @file stack.hpp
/// @brief moe::Stack<Layer>: L MoE layers with residual connections, h_{l+1} = h_l + MoE_l(h_l), forward and
/// backward, passing the routing state from layer to layer:
///  - MoE++ gating residuals: with a router that passes logits on (moe::links_logits: a routers::GatingResidual,
///    also inside WithLosses/CapacityLimited), layer l's raw logits feed layer l+1's router (LayerLinks), and
///    their gradient flows back (LayerLinkGradients);
///  - pre-gating (Pre-gated MoE, Read-ME; StackOptions::pre_gating): layer l+1 routes on h_l, layer l's
///    input, so its experts are known before layer l runs; set_prefetch() receives them at that point.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "config.hpp"
#include "detail/eigen_view.hpp"
#include "error.hpp"
#include "moe_layer.hpp"
#include "random.hpp"
#include "route_io.hpp"
#include "workspace.hpp"

namespace moe {

/// Options of a Stack.
struct StackOptions {
  /// Layer l+1's router reads h_l (the input of layer l) instead of h_{l+1}; the first layer routes on its
  /// own input (its extra gate). Not combinable with gating residuals (which need layer l's logits first).
  bool pre_gating = false;
};

template <class Layer>
class Stack;

/// What a Stack's training forward records for its backward (one TrainingContext per layer, the logits
/// passed between layers) and the per-layer routing results. Caller-owned and reusable.
template <class T>
class StackContext {
 public:
  /// Layer l's routing in the recorded forward (views valid until this context's next forward).
  const ForwardResult<T>& result(std::size_t l) const { return results_.at(l); }
  std::size_t n_layers() const { return results_.size(); }  ///< layers recorded
  /// Layer l's global-batch counts (TrainingContext::global_batch): reset each layer's once per optimizer step.
  GlobalBatchCounts& global_batch(std::size_t l) { return layers_.at(l).global_batch(); }
  /// h_l, the input of layer l (l = n_layers(): the stack's output), (n_tokens, d_model).
  ConstMatrixView<T> hidden(std::size_t l) const { return h_.at(l); }
  /// Layer l's raw router logits (n_tokens, n_experts), with gating residuals only (empty otherwise).
  ConstMatrixView<T> logits(std::size_t l) const { return l < logits_.size() ? ConstMatrixView<T>(logits_[l]) : ConstMatrixView<T>(); }

 private:
  template <class Layer>
  friend class Stack;
  std::vector<TrainingContext<T>> layers_;
  std::vector<ForwardResult<T>> results_;
  std::vector<RowMatrix<T>> h_;        // h_0 .. h_L
  std::vector<RowMatrix<T>> logits_;   // (n_tokens, n_experts) per layer (gating residuals)
  std::vector<RowMatrix<T>> dlogits_;  // their gradients
  RowMatrix<T> out_, dh_, dlayer_, drouter_, pending_;
  Index n_tokens_ = -1;
  const void* stack_ = nullptr;
};

/// A stack of layers of one type with residual connections; see the file comment.
template <class Layer>
class Stack {
 public:
  using Scalar = typename Layer::Scalar;
  using T = Scalar;

  /// @param layers at least one; all of one d_model (throws moe::Error otherwise, or when pre-gating is
  /// asked for with gating-residual routers)
  explicit Stack(std::vector<Layer> layers, const StackOptions& options = {})
      : layers_(std::move(layers)), options_(options) {
    detail::require(!layers_.empty(), "moe::Stack: needs at least one layer");
    for (std::size_t l = 0; l < layers_.size(); ++l)
      detail::require(layers_[l].d_model() == layers_[0].d_model(), "moe::Stack: layer ", l, " has d_model = ",
                      layers_[l].d_model(), ", layer 0 has ", layers_[0].d_model());
    detail::require(!(options_.pre_gating && residual),
                    "moe::Stack: pre_gating cannot be combined with gating residuals (GatingResidual routers)");
  }

  Index d_model() const { return layers_[0].d_model(); }        ///< token width
  std::size_t n_layers() const { return layers_.size(); }       ///< layers
  Layer& layer(std::size_t l) { return layers_.at(l); }         ///< layer l
  const Layer& layer(std::size_t l) const { return layers_.at(l); }
  const StackOptions& options() const { return options_; }      ///< the options

  /// Pre-gating: f(l, routing) is called with layer l's routing before layer l-1 runs (for l = 0: before
  /// layer 0), so the caller can fetch those experts while layer l-1 computes. The routing is exactly the one
  /// layer l then uses. Empty f: no calls. Costs one extra router pass per layer.
  void set_prefetch(std::function<void(std::size_t, const ForwardResult<T>&)> f) { prefetch_ = std::move(f); }

  /// Initialises layer l from the l-th draw of Rng(seed) (reproducible).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    for (auto& layer : layers_) layer.init(rng.next());
  }

  /// Training forward: y = h_L, records in ctx what backward needs; returns the sum of every layer's aux
  /// loss (ctx.result(l) has each layer's routing). `sequence_starts` as for MoELayer::forward. y may be x.
  double forward(ConstMatrixView<T> x, MatrixView<T> y, StackContext<T>& ctx, std::span<const Index> sequence_starts = {}) {
    return run(x, y, &ctx, sequence_starts);
  }
  /// Inference forward (nothing recorded); returns the summed aux loss.
  double forward(ConstMatrixView<T> x, MatrixView<T> y, std::span<const Index> sequence_starts = {}) {
    return run(x, y, nullptr, sequence_starts);
  }

  /// Backward of the training forward in ctx: writes dx and ADDS every parameter's gradient (the layers'
  /// aux-loss gradients included). dx may be dy. Throws moe::Error, before any layer writes a gradient, when a
  /// parameter was written since that forward (named as visit_parameters names it, e.g. "layer0.bank0.w1").
  void backward(ConstMatrixView<T> dy, MatrixView<T> dx, StackContext<T>& ctx) {
    detail::require(ctx.stack_ == this, "moe::Stack::backward: the StackContext was not recorded by this stack");
    detail::require(dy.rows() == ctx.n_tokens_ && dy.cols() == d_model() && dx.rows() == dy.rows() &&
                        dx.cols() == d_model(),
                    "moe::Stack::backward: dy is (", dy.rows(), ", ", dy.cols(), ") and dx (", dx.rows(), ", ",
                    dx.cols(), "), expected (", ctx.n_tokens_, ", ", d_model(), ")");
    if (dy.rows() == 0) return;  // no token: no gradient, and no weight read
    // Every layer is checked before the top one runs its backward: nothing is written when one is stale.
    for (std::size_t l = 0; l < layers_.size(); ++l)
      if (const std::string name = layers_[l].modified_parameter(ctx.layers_[l]); !name.empty())
        throw Error(detail::stale_backward_message("moe::Stack::backward", "layer" + std::to_string(l) + "." + name));
    const Index n = dy.rows(), d = d_model();
    ctx.dh_ = detail::eigen(dy);  // dL/dh_{l+1}, from the top down
    ctx.pending_.setZero(n, d);
    ctx.dlayer_.resize(n, d);
    ctx.drouter_.resize(n, d);
    for (std::size_t l = layers_.size(); l-- > 0;) {
      const bool routed_early = options_.pre_gating && l > 0;
      LayerLinkGradients<T> links;
      if (routed_early) links.d_router_input = view(ctx.drouter_);
      if constexpr (residual) {
        if (l + 1 < layers_.size()) links.d_logits = view(ctx.dlogits_[l]);
        if (l > 0) {
          ctx.dlogits_[l - 1].setZero();
          links.d_previous_logits = view(ctx.dlogits_[l - 1]);
        }
      }
      layers_[l].backward(ctx.dh_, ctx.dlayer_, ctx.layers_[l], links);
      // h_{l+1} = h_l + MoE_l(h_l): dL/dh_l = dL/dh_{l+1} + the layer's dx + layer l+1's router gradient.
      ctx.dh_ += ctx.dlayer_ + ctx.pending_;
      if (routed_early) {
        ctx.pending_ = ctx.drouter_;
      } else {
        ctx.pending_.setZero();
      }
    }
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) dx(t, j) = ctx.dh_(t, j);
  }

  /// f(name, Parameter&) for every parameter: "layer<l>.<the layer's name>".
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t l = 0; l < layers_.size(); ++l)
      layers_[l].visit_parameters([&](const std::string& name, auto& p) { f("layer" + std::to_string(l) + "." + name, p); });
  }
  /// f(name, values) for every state buffer: "layer<l>.<the layer's name>".
  template <class F>
  void visit_state(F&& f) {
    for (std::size_t l = 0; l < layers_.size(); ++l)
      layers_[l].visit_state(
          [&](const std::string& name, auto values) { f("layer" + std::to_string(l) + "." + name, values); });
  }
  /// Sets every gradient to zero.
  void zero_grad() {
    for (auto& layer : layers_) layer.zero_grad();
  }

 private:
  // Whether the layers' routers pass gate logits from layer to layer (gating residuals).
  static constexpr bool residual = links_logits<typename Layer::RouterType>;

  static MatrixView<T> view(RowMatrix<T>& m) { return MatrixView<T>(m.data(), m.rows(), m.cols()); }

  double run(ConstMatrixView<T> x, MatrixView<T> y, StackContext<T>* training, std::span<const Index> sequence_starts) {
    detail::require(x.cols() == d_model() && y.rows() == x.rows() && y.cols() == d_model(), "moe::Stack::forward: x is (",
                    x.rows(), ", ", x.cols(), ") and y (", y.rows(), ", ", y.cols(), "), expected (n, ", d_model(), ")");
    StackContext<T>& ctx = training != nullptr ? *training : inference_;
    const Index n = x.rows(), d = d_model();
    const std::size_t L = layers_.size();
    ctx.stack_ = this;
    ctx.n_tokens_ = n;
    ctx.layers_.resize(L);
    ctx.results_.assign(L, {});
    ctx.h_.resize(L + 1);
    ctx.h_[0].resize(n, d);
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) ctx.h_[0](t, j) = x(t, j);
    if constexpr (residual) {
      ctx.logits_.resize(L);
      ctx.dlogits_.resize(L);
      for (std::size_t l = 0; l < L; ++l) {
        ctx.logits_[l].resize(n, layers_[l].n_experts());
        ctx.dlogits_[l].resize(n, layers_[l].n_experts());
      }
    }
    ctx.out_.resize(n, d);
    double aux = 0;
    if (options_.pre_gating && prefetch_) prefetch_(0, layers_[0].route(ctx.h_[0], prefetch_ws_));
    for (std::size_t l = 0; l < L; ++l) {
      const bool routed_early = options_.pre_gating && l > 0;
      if (options_.pre_gating && prefetch_ && l + 1 < L) prefetch_(l + 1, layers_[l + 1].route(ctx.h_[l], prefetch_ws_));
      LayerLinks<T> links;
      if (routed_early) links.router_input = ConstMatrixView<T>(ctx.h_[l - 1]);
      if constexpr (residual) {
        if (l > 0) links.previous_logits = ConstMatrixView<T>(ctx.logits_[l - 1]);
        links.logits = view(ctx.logits_[l]);
      }
      const ForwardResult<T> res = training != nullptr
                                       ? layers_[l].forward(ctx.h_[l], ctx.out_, ctx.layers_[l], sequence_starts, links)
                                       : layers_[l].forward(ctx.h_[l], ctx.out_, ws_, sequence_starts, links);
      if (training != nullptr) ctx.results_[l] = res;
      aux += res.aux_loss;
      ctx.h_[l + 1] = ctx.h_[l] + ctx.out_;
    }
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) y(t, j) = ctx.h_[L](t, j);
    return aux;
  }

  std::vector<Layer> layers_;
  StackOptions options_;
  std::function<void(std::size_t, const ForwardResult<T>&)> prefetch_;
  StackContext<T> inference_;  // buffers of the inference forward
  Workspace ws_, prefetch_ws_;
};

}  // namespace moe
