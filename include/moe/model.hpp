#pragma once
/// @file model.hpp
/// @brief moe::Model<Layers...>: a residual stack of layers of mixed types, h_{l+1} = h_l + layer_l(h_l), e.g.
/// DeepSeek-V3's MLP blocks (dense layers first, then DeepSeekMoE layers) as one object:
///   Model<DenseLayer<experts::Shared<experts::SwiGLU<float>>>, MixtralMoE, DeepSeekMoE>
/// holds any sequence of those three types. Parameters are named "layers.<l>.mlp.<the layer's name>"
/// ("layers.0.mlp.bank0.w1", "layers.1.mlp.router.gate"), state buffers likewise ("layers.2.mlp.router.bias"), so
/// one optimizer keys its moments by full name over the whole model and a checkpoint holds it whole.
///
/// Unlike moe::Stack (one layer type), a Model passes nothing between layers: no gating residuals (a router that
/// passes logits on runs as the first layer of a stack would, without previous logits) and no pre-gating. Only
/// the residual path joins the layers; there are no norms or attention blocks.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "moe_layer.hpp"
#include "random.hpp"
#include "route_io.hpp"
#include "workspace.hpp"

namespace moe {

template <class... Layers>
class Model;

namespace detail {

/// True when no type appears twice in Ts.
template <class... Ts>
inline constexpr bool all_distinct = true;
template <class T, class... Ts>
inline constexpr bool all_distinct<T, Ts...> = (!std::is_same_v<T, Ts> && ...) && all_distinct<Ts...>;

/// The position of L in Ts (Ts distinct).
template <class L, class... Ts>
constexpr std::size_t index_in() {
  std::size_t i = 0, found = sizeof...(Ts);
  ((std::is_same_v<L, Ts> ? (found = i, ++i) : ++i), ...);
  return found;
}

}  // namespace detail

/// What a Model's training forward records for its backward (one context per layer, of that layer's kind: a
/// TrainingContext for an MoELayer, a DenseContext for a DenseLayer) and the per-layer results. Caller-owned and
/// reusable; one per forward in flight.
template <class... Layers>
class ModelContext {
 public:
  using Scalar = typename std::tuple_element_t<0, std::tuple<Layers...>>::Scalar;
  using T = Scalar;

  /// Layer l's result in the recorded forward (routing of an MoE layer; n_tokens only for a dense one). Views
  /// valid until this context's next forward.
  const ForwardResult<T>& result(std::size_t l) const { return results_.at(l); }
  std::size_t n_layers() const { return results_.size(); }  ///< layers recorded
  Index n_tokens() const { return n_tokens_; }              ///< tokens of the recorded forward (-1 before any)
  /// h_l, the input of layer l (l = n_layers(): the model's output), (n_tokens, d_model).
  ConstMatrixView<T> hidden(std::size_t l) const { return h_.at(l); }
  /// Layer l's global-batch counts (TrainingContext::global_batch; reset once per optimizer step; a dense layer's
  /// stay empty). Throws moe::Error when the context has no layer l.
  GlobalBatchCounts& global_batch(std::size_t l) {
    detail::require(l < layers_.size(), "moe::ModelContext::global_batch: layer ", l, " of ", layers_.size(),
                    " recorded");
    return std::visit([](auto& c) -> GlobalBatchCounts& { return c.global_batch(); }, layers_[l]);
  }
  /// Resets the global-batch counts of every layer (once per optimizer step).
  void reset_global_batch() {
    for (auto& layer : layers_) std::visit([](auto& c) { c.global_batch().reset(); }, layer);
  }

 private:
  template <class... Ls>
  friend class Model;
  // Alternative i is the context of Layers[i] (types may repeat: accessed by index only).
  std::vector<std::variant<typename Layers::Context...>> layers_;
  std::vector<ForwardResult<T>> results_;
  std::vector<RowMatrix<T>> h_;  // h_0 .. h_L
  RowMatrix<T> out_, dh_, dlayer_;
  Index n_tokens_ = -1;
  const void* model_ = nullptr;
};

/// A residual stack of layers of the types Layers... (MoELayer presets, DenseLayer, ...); see the file comment.
/// @tparam Layers distinct layer types of one Scalar, each with d_model(), init(seed), workspace_bytes(n),
///                forward(x, y, ws) const, a training forward(x, y, ctx) const, backward(dy, dx, ctx),
///                modified_parameter(ctx), visit_parameters(f), zero_grad() (and optionally visit_state(f)):
///                MoELayer and DenseLayer
///
/// Threading: forward(x, y, ws) is const (one Workspace per concurrent caller), and so is the training forward
/// (one ModelContext each); backward accumulates into the layers' gradients, one at a time.
template <class... Layers>
class Model {
  static_assert(sizeof...(Layers) >= 1, "moe::Model<Layers...>: give at least one layer type");
  static_assert(detail::all_distinct<Layers...>,
                "moe::Model<Layers...>: list each layer type once (a Model holds any number of layers of each)");
  using First = std::tuple_element_t<0, std::tuple<Layers...>>;
  static_assert((std::is_same_v<typename Layers::Scalar, typename First::Scalar> && ...),
                "moe::Model<Layers...>: every layer type must have the same Scalar");

 public:
  using Scalar = typename First::Scalar;
  using T = Scalar;
  using Layer = std::variant<Layers...>;    ///< one layer, of any of the types
  using Context = ModelContext<Layers...>;  ///< what the training forward records

  /// An empty model: add() layers before the first forward.
  Model() = default;
  /// A model of these layers, in order; all of one d_model (throws moe::Error otherwise, or when none is given).
  explicit Model(std::vector<Layer> layers) {
    detail::require(!layers.empty(), "moe::Model: needs at least one layer");
    layers_.reserve(layers.size());
    for (auto& layer : layers) add(std::move(layer));
  }
  /// A model of these layers, in order (each of one of the types Layers...), e.g. Model<Dense, MoE>(dense, moe).
  template <class... Ls>
  requires(sizeof...(Ls) >= 1 && (std::is_constructible_v<Layer, Ls&&> && ...)) explicit Model(Ls&&... layers) {
    layers_.reserve(sizeof...(Ls));
    (add(std::forward<Ls>(layers)), ...);
  }

  /// Appends a layer (moved in). Throws moe::Error when its d_model differs from the model's.
  template <class L>
  requires std::is_constructible_v<Layer, L&&>
  void add(L&& layer) {
    Layer v(std::forward<L>(layer));
    const Index d = std::visit([](const auto& l) { return l.d_model(); }, v);
    if (!layers_.empty())
      detail::require(d == d_model(), "moe::Model::add: layer ", layers_.size(), " has d_model = ", d,
                      ", the model's layers have d_model = ", d_model());
    layers_.push_back(std::move(v));
  }

  /// Token width. Throws moe::Error on an empty model.
  Index d_model() const {
    require_layers("moe::Model::d_model");
    return std::visit([](const auto& l) { return l.d_model(); }, layers_[0]);
  }
  std::size_t n_layers() const { return layers_.size(); }  ///< layers
  /// Layer l (the variant).
  Layer& layer(std::size_t l) { return layers_.at(l); }
  const Layer& layer(std::size_t l) const { return layers_.at(l); }
  /// Layer l as an L; throws moe::Error when layer l is of another type.
  template <class L>
  L& layer(std::size_t l) {
    return as<L>(*this, l);
  }
  template <class L>
  const L& layer(std::size_t l) const {
    return as<L>(*this, l);
  }

  /// Initialises layer l from the l-th draw of Rng(seed) (reproducible; layers of one shape differ).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    for (auto& layer : layers_) std::visit([&](auto& l) { l.init(rng.next()); }, layer);
  }

  /// Bytes of scratch an inference forward over n_tokens needs: what forward(x, y, ws) reserves (the layers'
  /// largest workspace, then one (n_tokens, d_model) buffer for a layer's output).
  std::size_t workspace_bytes(Index n_tokens) const {
    require_layers("moe::Model::workspace_bytes");
    return output_offset(n_tokens) + output_bytes(n_tokens);
  }

  /// Inference forward: y = h_L, x and y (n_tokens, d_model); returns the sum of the layers' aux losses. y may
  /// be x itself. `sequence_starts` goes to every layer that takes it (MoELayer::forward). Grows `ws` on the
  /// first call at a size, not after. Throws moe::Error on an empty model or a wrong shape (and as the layers'
  /// forwards do: NaN or ±inf in x).
  double forward(ConstMatrixView<T> x, MatrixView<T> y, Workspace& ws,
                 std::span<const Index> sequence_starts = {}) const {
    check_input(x, y, "moe::Model::forward");
    const Index n = x.rows(), d = d_model();
    if (n == 0) return 0;
    // The layers carve their scratch from the start of ws (at most output_offset bytes); each layer's output
    // goes to the buffer after that, so one Workspace serves the whole model.
    const std::size_t offset = output_offset(n);
    ws.reserve(offset + output_bytes(n));
    const std::size_t allocations = ws.allocations();
    const MatrixView<T> out(reinterpret_cast<T*>(ws.data() + offset), n, d);
    if (y.data() != x.data() || y.stride() != x.stride())
      for (Index t = 0; t < n; ++t) std::copy_n(x.row(t), d, y.row(t));
    double aux = 0;
    for (const Layer& layer : layers_) {
      std::visit([&](const auto& l) { aux += l.forward(y, out, ws, sequence_starts).aux_loss; }, layer);
      detail::require(ws.allocations() == allocations,
                      "moe::Model::forward: a layer grew the workspace beyond its workspace_bytes()");
      for (Index t = 0; t < n; ++t)
        for (Index j = 0; j < d; ++j) y(t, j) += out(t, j);
    }
    return aux;
  }
  /// As above with a Workspace owned by the model (so this overload is not const).
  double forward(ConstMatrixView<T> x, MatrixView<T> y, std::span<const Index> sequence_starts = {}) {
    return forward(x, y, ws_, sequence_starts);
  }

  /// Training forward: as forward(), and records in ctx what backward needs (each layer's training context, the
  /// hidden states); ctx.result(l) has each layer's result. y may be x.
  double forward(ConstMatrixView<T> x, MatrixView<T> y, Context& ctx,
                 std::span<const Index> sequence_starts = {}) const {
    check_input(x, y, "moe::Model::forward");
    const Index n = x.rows(), d = d_model();
    const std::size_t L = layers_.size();
    ctx.model_ = this;
    ctx.n_tokens_ = n;
    ctx.layers_.resize(L);
    ctx.results_.assign(L, {});
    ctx.h_.resize(L + 1);
    ctx.h_[0].resize(n, d);
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) ctx.h_[0](t, j) = x(t, j);
    ctx.out_.resize(n, d);
    double aux = 0;
    for (std::size_t l = 0; l < L; ++l) {
      with_layer(layers_[l], [&](const auto& layer, auto index) {
        auto& c = context<decltype(index)::value>(ctx, l);
        const ConstMatrixView<T> h(ctx.h_[l]);
        const MatrixView<T> out = view(ctx.out_);
        ctx.results_[l] = layer.forward(h, out, c, sequence_starts);
      });
      aux += ctx.results_[l].aux_loss;
      ctx.h_[l + 1].noalias() = ctx.h_[l] + ctx.out_;
    }
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) y(t, j) = ctx.h_[L](t, j);
    return aux;
  }

  /// Backward of the training forward in ctx: writes dx and ADDS every parameter's gradient (the layers' aux-loss
  /// gradients included). dx may be dy. Throws moe::Error, before any layer writes a gradient, when ctx was not
  /// recorded by this model (or the model changed since), a shape is wrong, or a parameter was written since
  /// that forward (named as visit_parameters names it, e.g. "layers.1.mlp.bank0.w1").
  void backward(ConstMatrixView<T> dy, MatrixView<T> dx, Context& ctx) {
    constexpr const char* who = "moe::Model::backward";
    detail::require(ctx.model_ == this, who, ": the context was not recorded by a training forward of this model");
    detail::require(ctx.layers_.size() == layers_.size(), who, ": the context recorded ", ctx.layers_.size(),
                    " layers, the model has ", layers_.size(), " (a layer was added since)");
    detail::require(
        dy.rows() == ctx.n_tokens_ && dy.cols() == d_model() && dx.rows() == dy.rows() && dx.cols() == d_model(), who,
        ": dy is (", dy.rows(), ", ", dy.cols(), ") and dx (", dx.rows(), ", ", dx.cols(), "), expected (",
        ctx.n_tokens_, ", ", d_model(), ")");
    // Every layer is checked before the top one runs its backward: nothing is written when one is stale.
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      detail::require(ctx.layers_[l].index() == layers_[l].index(), who, ": layer ", l,
                      " was replaced by a layer of another type since the forward");
      with_layer(layers_[l], [&](const auto& layer, auto index) {
        if (const std::string name = layer.modified_parameter(std::get<decltype(index)::value>(ctx.layers_[l]));
            !name.empty())
          throw Error(detail::stale_backward_message(who, prefix(l) + name));
      });
    }
    if (dy.rows() == 0) return;  // no token: no gradient, and no weight read
    const Index n = dy.rows(), d = d_model();
    ctx.dh_.resize(n, d);  // dL/dh_{l+1}, from the top down
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) ctx.dh_(t, j) = dy(t, j);
    ctx.dlayer_.resize(n, d);
    for (std::size_t l = layers_.size(); l-- > 0;) {
      with_layer(layers_[l], [&](auto& layer, auto index) {
        layer.backward(ctx.dh_, view(ctx.dlayer_), std::get<decltype(index)::value>(ctx.layers_[l]));
      });
      // h_{l+1} = h_l + layer_l(h_l): dL/dh_l = dL/dh_{l+1} + the layer's dx.
      ctx.dh_ += ctx.dlayer_;
    }
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < d; ++j) dx(t, j) = ctx.dh_(t, j);
  }

  /// f(name, Parameter&) for every parameter, layer by layer: "layers.<l>.mlp.<the layer's name>".
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t l = 0; l < layers_.size(); ++l)
      std::visit(
          [&](auto& layer) {
            layer.visit_parameters([&](const std::string& name, auto& p) { f(prefix(l) + name, p); });
          },
          layers_[l]);
  }
  /// f(name, values) for every state buffer (a selection bias, a frozen base): "layers.<l>.mlp.<name>".
  template <class F>
  void visit_state(F&& f) {
    for (std::size_t l = 0; l < layers_.size(); ++l)
      std::visit(
          [&](auto& layer) {
            layer.visit_state([&](const std::string& name, auto values) { f(prefix(l) + name, values); });
          },
          layers_[l]);
  }
  /// Sets every gradient to zero.
  void zero_grad() {
    for (auto& layer : layers_) std::visit([](auto& l) { l.zero_grad(); }, layer);
  }

 private:
  static std::string prefix(std::size_t l) { return "layers." + std::to_string(l) + ".mlp."; }
  static MatrixView<T> view(RowMatrix<T>& m) { return MatrixView<T>(m.data(), m.rows(), m.cols()); }

  // Calls f(layer, std::integral_constant<std::size_t, I>) with the alternative I held by `layer`.
  template <class V, class F>
  static void with_layer(V& layer, F&& f) {
    std::visit(
        [&](auto& l) {
          constexpr std::size_t I = detail::index_in<std::remove_cvref_t<decltype(l)>, Layers...>();
          f(l, std::integral_constant<std::size_t, I>{});
        },
        layer);
  }

  // ctx's context of layer l as alternative I (made afresh when it held another kind).
  template <std::size_t I>
  static auto& context(Context& ctx, std::size_t l) {
    if (ctx.layers_[l].index() != I) ctx.layers_[l].template emplace<I>();
    return std::get<I>(ctx.layers_[l]);
  }

  template <class L, class Self>
  static auto& as(Self& self, std::size_t l) {
    detail::require(l < self.layers_.size(), "moe::Model::layer: layer ", l, " of ", self.layers_.size());
    auto* p = std::get_if<L>(&self.layers_[l]);
    detail::require(p != nullptr, "moe::Model::layer: layer ", l, " is not of the type asked for (it holds type ",
                    self.layers_[l].index(), " of Model's list)");
    return *p;
  }

  void require_layers(const char* who) const {
    detail::require(!layers_.empty(), who, ": the model has no layers; add() at least one");
  }

  void check_input(ConstMatrixView<T> x, MatrixView<T> y, const char* who) const {
    require_layers(who);
    detail::require(x.cols() == d_model() && y.rows() == x.rows() && y.cols() == d_model(), who, ": x is (", x.rows(),
                    ", ", x.cols(), ") and y (", y.rows(), ", ", y.cols(), "), expected (n, ", d_model(), ")");
  }

  // Where a layer's output starts in the inference workspace: after the largest layer workspace, aligned.
  std::size_t output_offset(Index n_tokens) const {
    std::size_t peak = 0;
    for (const Layer& layer : layers_)
      peak = std::max(peak, std::visit([&](const auto& l) { return l.workspace_bytes(n_tokens); }, layer));
    return (peak + k_workspace_alignment - 1) / k_workspace_alignment * k_workspace_alignment;
  }
  std::size_t output_bytes(Index n_tokens) const {
    return static_cast<std::size_t>(
               detail::checked_size<T>("moe::Model", "n_tokens * d_model", {n_tokens, d_model()})) *
           sizeof(T);
  }

  std::vector<Layer> layers_;
  Workspace ws_;  // used by the non-const forward overload only
};

}  // namespace moe
