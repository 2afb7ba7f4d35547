#pragma once
/// @file experts/ffn.hpp
/// @brief Bank of feed-forward experts: gated (SwiGLU, GeGLU) y = W2 (act(W1 x) * (W3 x)), or plain
/// y = W2 act(W1 x).
///
/// Weight layout follows Hugging Face Mixtral/Qwen naming, each row-major (out_features, in_features) like
/// nn.Linear, so checkpoints map without transposition: w1 = gate_proj (d_ff, d_model), w3 = up_proj
/// (d_ff, d_model), w2 = down_proj (d_model, d_ff). Plain (non-gated) banks have no w3. Optional biases
/// (FFNOptions::bias) b1, b3 (d_ff) and b2 (d_model) are the projections' nn.Linear biases.

#include <algorithm>
#include <string_view>

#include "../config.hpp"
#include "../detail/linalg.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/activation.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "detail/dense.hpp"
#include "init.hpp"

namespace moe::experts {

/// Options of an FFN bank beyond its shape.
struct FFNOptions {
  bool bias = false;                 ///< nn.Linear biases b1, b3, b2 (Hugging Face `mlp_bias`)
  InitPolicy init = UniformFanIn{};  ///< weights; biases follow nn.Linear (uniform) or HF (zero otherwise)
};

/// A bank of n_experts FFN experts of one shape.
/// @tparam T     scalar type
/// @tparam Act   activation policy (kernels::SiLU, GELU, GELUTanh, ReLU)
/// @tparam Gated true: act(W1 x) * (W3 x) (SwiGLU with SiLU); false: act(W1 x)
/// @tparam Arch  instruction set of the kernels
template <class T, class Act = kernels::SiLU, bool Gated = true, class Arch = kernels::default_arch>
class FFN {
 public:
  using Scalar = T;
  using Activation = Act;
  static constexpr bool gated = Gated;

  /// @param cfg  shape (validated: throws moe::Error naming the bad field); weights start at 0, call init()
  /// @param opts biases and init policy
  explicit FFN(const MoEConfig& cfg, FFNOptions opts = {})
      : d_model_(cfg.validated().d_model),
        d_ff_(cfg.d_ff),
        n_experts_(cfg.n_experts),
        w1_(n_experts_ * d_ff_, d_model_),
        w3_(Gated ? n_experts_ * d_ff_ : 0, d_model_),
        w2_(n_experts_ * d_model_, d_ff_),
        opts_(opts),
        b1_(opts.bias ? n_experts_ : 0, d_ff_),
        b3_(opts.bias && Gated ? n_experts_ : 0, d_ff_),
        b2_(opts.bias ? n_experts_ : 0, d_model_) {}

  Index d_model() const { return d_model_; }      ///< token width
  Index d_ff() const { return d_ff_; }            ///< hidden width
  Index n_experts() const { return n_experts_; }  ///< experts in the bank

  /// gate_proj of expert e, (d_ff, d_model).
  MatrixView<T> w1(Index e) { return {w1_.data() + e * d_ff_ * d_model_, d_ff_, d_model_}; }
  ConstMatrixView<T> w1(Index e) const { return {w1_.data() + e * d_ff_ * d_model_, d_ff_, d_model_}; }
  /// up_proj of expert e, (d_ff, d_model); gated banks only.
  MatrixView<T> w3(Index e) requires Gated { return {w3_.data() + e * d_ff_ * d_model_, d_ff_, d_model_}; }
  ConstMatrixView<T> w3(Index e) const requires Gated {
    return {w3_.data() + e * d_ff_ * d_model_, d_ff_, d_model_};
  }
  /// down_proj of expert e, (d_model, d_ff).
  MatrixView<T> w2(Index e) { return {w2_.data() + e * d_model_ * d_ff_, d_model_, d_ff_}; }
  ConstMatrixView<T> w2(Index e) const { return {w2_.data() + e * d_model_ * d_ff_, d_model_, d_ff_}; }

  /// True when the bank has biases (FFNOptions::bias).
  bool has_bias() const { return opts_.bias; }
  /// Bias of w1 (gate_proj) of expert e, (1, d_ff); banks with biases only (throws moe::Error otherwise).
  MatrixView<T> b1(Index e) { return bias_row(b1_, e); }
  /// Bias of w3 (up_proj) of expert e, (1, d_ff); gated banks with biases only.
  MatrixView<T> b3(Index e) requires Gated { return bias_row(b3_, e); }
  /// Bias of w2 (down_proj) of expert e, (1, d_model); banks with biases only.
  MatrixView<T> b2(Index e) { return bias_row(b2_, e); }

  /// The init policy of FFNOptions (default nn.Linear's U(-1/sqrt(in), 1/sqrt(in))) for each projection;
  /// biases U(-1/sqrt(in), 1/sqrt(in)) under that default, zero under any other policy (as HF does).
  void init(Rng& rng) {
    initialize(rng, opts_.init, w1_, d_model_);
    initialize(rng, opts_.init, w3_, d_model_);
    initialize(rng, opts_.init, w2_, d_ff_);
    const InitPolicy bias_init = std::holds_alternative<UniformFanIn>(opts_.init) ? opts_.init : Zeros{};
    initialize(rng, bias_init, b1_, d_model_);
    initialize(rng, bias_init, b3_, d_model_);
    initialize(rng, bias_init, b2_, d_ff_);
  }

  /// Calls f(name, Parameter&) for "w1" (n_experts * d_ff, d_model), "w3" (gated only) and
  /// "w2" (n_experts * d_model, d_ff): every expert's matrix stacked, expert 0 first; with biases also
  /// "b1" (n_experts, d_ff), "b3" (gated only) and "b2" (n_experts, d_model).
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w1"), w1_);
    if constexpr (Gated) f(std::string_view("w3"), w3_);
    f(std::string_view("w2"), w2_);
    if (!opts_.bias) return;
    f(std::string_view("b1"), b1_);
    if constexpr (Gated) f(std::string_view("b3"), b3_);
    f(std::string_view("b2"), b2_);
  }

  /// Runs expert e on grouped rows [offsets[e], offsets[e+1]) of xs (rows, d_model) into ys.
  /// Work items are (expert, column tile): the hidden tiles first, then the output tiles, each computed by
  /// one thread, so results do not depend on the thread count.
  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    const Index n_rows = xs.rows();
    T* hidden = arena.take<T>(n_rows * d_ff_);               // (rows, d_ff): act(W1 x) [* W3 x]
    T* up = arena.take<T>(Gated ? n_rows * d_ff_ : 0);     // (rows, d_ff): W3 x
    if (arena.measuring() || n_rows == 0) return;

    const Index ff_tiles = (d_ff_ + k_tile - 1) / k_tile;
    MOE_OMP(omp parallel for schedule(dynamic) collapse(2))
    for (Index e = 0; e < n_experts_; ++e) {
      for (Index tile = 0; tile < ff_tiles; ++tile) {
        const Index r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const Index c0 = tile * k_tile, nc = std::min(k_tile, d_ff_ - c0);
        const auto x = xs.middle_rows(r0, n);                     // (n, d_model)
        const MatrixView<T> h(hidden + r0 * d_ff_ + c0, n, nc, d_ff_);  // (n, nc) of (n, d_ff)
        kernels::matmul_nt(Arch{}, x, w1(e).middle_rows(c0, nc), h);
        add_bias(b1_, e, c0, h);
        if constexpr (Gated) {
          const MatrixView<T> u(up + r0 * d_ff_ + c0, n, nc, d_ff_);
          kernels::matmul_nt(Arch{}, x, w3(e).middle_rows(c0, nc), u);
          add_bias(b3_, e, c0, u);
          for (Index i = 0; i < n; ++i) kernels::gated_activate<Act>(Arch{}, h.row(i), u.row(i), h.row(i), nc);
        } else {
          for (Index i = 0; i < n; ++i) kernels::activate<Act>(Arch{}, h.row(i), h.row(i), nc);
        }
      }
    }

    const Index d_tiles = (d_model_ + k_tile - 1) / k_tile;
    MOE_OMP(omp parallel for schedule(dynamic) collapse(2))
    for (Index e = 0; e < n_experts_; ++e) {
      for (Index tile = 0; tile < d_tiles; ++tile) {
        const Index r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const Index c0 = tile * k_tile, nc = std::min(k_tile, d_model_ - c0);
        const MatrixView<T> y(ys.row(r0) + c0, n, nc, ys.stride());  // (n, nc) of (n, d_model)
        kernels::matmul_nt(Arch{}, ConstMatrixView<T>(hidden + r0 * d_ff_, n, d_ff_), w2(e).middle_rows(c0, nc), y);
        add_bias(b2_, e, c0, y);
      }
    }
  }

  /// Backward on grouped rows: from dys (rows, d_model) writes dxs (rows, d_model) and accumulates the
  /// weight gradients. The hidden activations are recomputed from xs instead of stored by forward: one
  /// more pass over W1 (and W3), no training memory per token. Work items are experts; an expert without
  /// rows adds nothing, so its gradient stays exactly as it was (0 after zero_grad).
  void backward(ConstMatrixView<T> xs, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs,
                Arena& arena) {
    const Index n_rows = xs.rows();
    T* gate = arena.take<T>(n_rows * d_ff_);              // (rows, d_ff) W1 x, then dL/d(W1 x)
    T* up = arena.take<T>(Gated ? n_rows * d_ff_ : 0);   // (rows, d_ff) W3 x, then dL/d(W3 x)
    T* hidden = arena.take<T>(n_rows * d_ff_);            // (rows, d_ff) act(W1 x) [* W3 x], then dL/dh
    if (arena.measuring() || n_rows == 0) return;
    // Gradients are allocated here, outside the parallel region.
    const MatrixView<T> dw1 = w1_.grad(), dw2 = w2_.grad();
    const MatrixView<T> dw3 = Gated ? w3_.grad() : MatrixView<T>();
    const MatrixView<T> db1 = b1_.grad(), db3 = b3_.grad(), db2 = b2_.grad();  // (n_experts or 0, *)
    const FFN& self = *this;  // const accessors give ConstMatrixView weights

    MOE_OMP(omp parallel for schedule(dynamic))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const auto x = xs.middle_rows(r0, n);    // (n, d_model)
      const auto dy = dys.middle_rows(r0, n);  // (n, d_model)
      const MatrixView<T> g(gate + r0 * d_ff_, n, d_ff_), h(hidden + r0 * d_ff_, n, d_ff_);
      const MatrixView<T> u = Gated ? MatrixView<T>(up + r0 * d_ff_, n, d_ff_) : MatrixView<T>();
      detail::linear<Arch, T>(x, self.w1(e), bias_of(b1_, e), g);
      if constexpr (Gated) detail::linear<Arch, T>(x, self.w3(e), bias_of(b3_, e), u);
      detail::activate_rows<Act, Gated, Arch, T>(g, u, h);
      detail::linear_backward<T>(dy, h, {}, dw2.middle_rows(e * d_model_, d_model_), bias_of(db2, e), {});
      detail::set_zero(h);
      detail::linear_backward<T>(dy, {}, self.w2(e), {}, nullptr, h);  // dh = dy W2   (n, d_ff)
      detail::activation_backward<Act, Gated, T>(h, g, u);
      const auto dx = dxs.middle_rows(r0, n);  // (n, d_model)
      detail::set_zero(dx);
      // dx = dg W1 [+ du W3]; dW1 += dg^T x; dW3 += du^T x
      detail::linear_backward<T>(g, x, self.w1(e), dw1.middle_rows(e * d_ff_, d_ff_), bias_of(db1, e), dx);
      if constexpr (Gated)
        detail::linear_backward<T>(u, x, self.w3(e), dw3.middle_rows(e * d_ff_, d_ff_), bias_of(db3, e), dx);
    }
  }

 private:
  // Output columns per work item: enough items to balance two or more threads on one expert (decode),
  // few enough that each streams a long run of weight rows.
  static constexpr Index k_tile = 256;

  MatrixView<T> bias_row(Parameter<T>& b, Index e) {
    moe::detail::require(e >= 0 && e < b.rows(), "moe::experts::FFN: no bias for expert ", e,
                         " (construct with FFNOptions{.bias = true})");
    return b.value().middle_rows(e, 1);
  }
  // Expert e's row of a bias or bias gradient, nullptr when the bank has none.
  static const T* bias_of(const Parameter<T>& b, Index e) { return b.rows() == 0 ? nullptr : b.data() + e * b.cols(); }
  static T* bias_of(MatrixView<T> b, Index e) { return b.rows() == 0 ? nullptr : b.row(e); }
  // y += columns [c0, c0 + y.cols()) of expert e's bias on every row (nothing without biases).
  static void add_bias(const Parameter<T>& b, Index e, Index c0, MatrixView<T> y) {
    if (const T* row = bias_of(b, e))
      for (Index i = 0; i < y.rows(); ++i) kernels::axpy(Arch{}, T(1), row + c0, y.row(i), y.cols());
  }

  Index d_model_;
  Index d_ff_;
  Index n_experts_;
  Parameter<T> w1_;  // (n_experts * d_ff, d_model)
  Parameter<T> w3_;  // (n_experts * d_ff, d_model), empty unless Gated
  Parameter<T> w2_;  // (n_experts * d_model, d_ff)
  FFNOptions opts_;
  Parameter<T> b1_;  // (n_experts, d_ff), empty without biases
  Parameter<T> b3_;  // (n_experts, d_ff), empty without biases or unless Gated
  Parameter<T> b2_;  // (n_experts, d_model), empty without biases
};

/// SwiGLU experts (Mixtral, Qwen, DeepSeek).
template <class T, class Arch = kernels::default_arch>
using SwiGLU = FFN<T, kernels::SiLU, true, Arch>;

}  // namespace moe::experts
