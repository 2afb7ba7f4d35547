#pragma once
/// @file experts/ffn.hpp
/// @brief Bank of feed-forward experts: gated (SwiGLU, GeGLU) y = W2 (act(W1 x) * (W3 x)), or plain
/// y = W2 act(W1 x).
///
/// Weight layout follows Hugging Face Mixtral/Qwen naming, each row-major (out_features, in_features) like
/// nn.Linear, so checkpoints map without transposition: w1 = gate_proj (d_ff, d_model), w3 = up_proj
/// (d_ff, d_model), w2 = down_proj (d_model, d_ff). Plain (non-gated) banks have no w3.

#include <algorithm>
#include <cmath>
#include <vector>

#include <xsimd/memory/xsimd_aligned_allocator.hpp>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/activation.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../moe_config.hpp"
#include "../random.hpp"
#include "../workspace.hpp"

namespace moe::experts {

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

  /// @param cfg shape (validated: throws moe::Error naming the bad field); weights start at 0, call init()
  explicit FFN(const MoEConfig& cfg)
      : d_model_(cfg.validated().d_model),
        d_ff_(cfg.d_ff),
        n_experts_(cfg.n_experts),
        w1_(size(d_ff_, d_model_)),
        w3_(Gated ? size(d_ff_, d_model_) : 0),
        w2_(size(d_model_, d_ff_)) {}

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

  /// nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for each projection.
  void init(Rng& rng) {
    fill_uniform(rng, w1_, d_model_);
    fill_uniform(rng, w3_, d_model_);
    fill_uniform(rng, w2_, d_ff_);
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
        if constexpr (Gated) {
          const MatrixView<T> u(up + r0 * d_ff_ + c0, n, nc, d_ff_);
          kernels::matmul_nt(Arch{}, x, w3(e).middle_rows(c0, nc), u);
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
        kernels::matmul_nt(Arch{}, ConstMatrixView<T>(hidden + r0 * d_ff_, n, d_ff_), w2(e).middle_rows(c0, nc),
                           MatrixView<T>(ys.row(r0) + c0, n, nc, ys.stride()));
      }
    }
  }

 private:
  using Buffer = std::vector<T, xsimd::aligned_allocator<T, 64>>;
  // Output columns per work item: enough items to balance two or more threads on one expert (decode),
  // few enough that each streams a long run of weight rows.
  static constexpr Index k_tile = 256;

  std::size_t size(Index rows, Index cols) const { return static_cast<std::size_t>(n_experts_ * rows * cols); }
  static void fill_uniform(Rng& rng, Buffer& w, Index fan_in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    for (auto& v : w) v = static_cast<T>(rng.uniform(-bound, bound));
  }

  Index d_model_;
  Index d_ff_;
  Index n_experts_;
  Buffer w1_;  // (n_experts, d_ff, d_model)
  Buffer w3_;  // (n_experts, d_ff, d_model), empty unless Gated
  Buffer w2_;  // (n_experts, d_model, d_ff)
};

/// SwiGLU experts (Mixtral, Qwen, DeepSeek).
template <class T, class Arch = kernels::default_arch>
using SwiGLU = FFN<T, kernels::SiLU, true, Arch>;

}  // namespace moe::experts
