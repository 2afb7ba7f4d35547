#pragma once
/// @file experts/shared.hpp
/// @brief Shared (always-on) experts: every token goes through all experts of an inner bank and their
/// outputs are summed, y_t = sum_e E_e(x_t) (DeepSeekMoE, arXiv 2401.06066), optionally scaled per token by
/// Qwen2-MoE's shared-expert gate, y_t = sigmoid(w_sg . x_t) sum_e E_e(x_t).
///
/// A Shared bank is not routed: it models moe::SharedBank (forward(x, y, arena) over all tokens), not
/// moe::ExpertBank, so a layer adds its output to the routed experts' combine instead of giving it slots.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <string_view>

#include "../concepts.hpp"
#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/activation.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "detail/dense.hpp"

namespace moe::experts {

/// The shared output is added as it is (DeepSeekMoE, DeepSeek-V2/V3).
struct NoSharedGate {};
/// The shared output is scaled by sigmoid(w_sg . x) per token, w_sg (1, d_model) without bias
/// (Qwen2-MoE's `shared_expert_gate`).
struct SigmoidSharedGate {};

/// Always-on experts.
/// @tparam Inner a moe::TrainableBank (e.g. experts::SwiGLU<T>); all its n_experts() experts run on every token
/// @tparam Gate  NoSharedGate or SigmoidSharedGate
template <class Inner, class Gate = NoSharedGate>
class Shared {
  static_assert(ExpertBank<Inner>, "moe::experts::Shared<Inner, Gate>: Inner must model moe::ExpertBank (e.g. SwiGLU<T>)");
  static_assert(std::same_as<Gate, NoSharedGate> || std::same_as<Gate, SigmoidSharedGate>,
                "moe::experts::Shared<Inner, Gate>: Gate must be NoSharedGate or SigmoidSharedGate");

 public:
  using Scalar = typename Inner::Scalar;
  using T = Scalar;
  static constexpr bool gated = std::same_as<Gate, SigmoidSharedGate>;

  /// @param cfg shape of the shared experts: n_experts of them, each of hidden width d_ff (top_k is unused)
  explicit Shared(const MoEConfig& cfg)
    requires std::is_constructible_v<Inner, const MoEConfig&>
      : Shared(Inner(cfg)) {}
  /// Wraps a bank built with its own options (e.g. FFN biases).
  explicit Shared(Inner inner) : inner_(std::move(inner)), gate_(gated ? 1 : 0, inner_.d_model()) {}

  Index d_model() const { return inner_.d_model(); }      ///< token width
  Index n_experts() const { return inner_.n_experts(); }  ///< shared experts (always on, not routed)
  const Inner& inner() const { return inner_; }           ///< the shared experts
  Inner& inner() { return inner_; }                       ///< the shared experts
  /// w_sg, (1, d_model); SigmoidSharedGate only.
  MatrixView<T> gate() requires gated { return gate_.value(); }
  ConstMatrixView<T> gate() const requires gated { return gate_.value(); }

  /// The inner bank's init, then w_sg as nn.Linear(d_model, 1).
  void init(Rng& rng) {
    inner_.init(rng);
    gate_.init_uniform(rng, d_model());
  }

  /// The inner bank's parameters under their own names, then "shared_gate" (1, d_model) when gated.
  template <class F>
  void visit_parameters(F&& f)
    requires TrainableBank<Inner>
  {
    inner_.visit_parameters(f);
    if constexpr (gated) f(std::string_view("shared_gate"), gate_);
  }
  /// The inner bank's state.
  template <class F>
  void visit_state(F&& f) requires TrainableBank<Inner> {
    inner_.visit_state(f);
  }

  /// y (n_tokens, d_model) = the shared output for every row of x (n_tokens, d_model). The inner bank runs
  /// once over x repeated n_experts times (its own parallel split over experts); each token's sum over
  /// experts is then added in expert order by one thread.
  void forward(ConstMatrixView<T> x, MatrixView<T> y, Arena& arena) const {
    const Index n = x.rows(), d = d_model(), rows = n * n_experts();
    const Scratch s = carve(arena, n);
    const std::size_t mark = arena.used();
    if (!arena.measuring()) replicate(x, s.xs);
    // While measuring this only sizes the inner bank's scratch (offsets are nullptr then, as in a layer).
    if (arena.measuring() || n > 0) inner_.forward(s.view(s.xs, rows, d), s.offsets, s.view(s.ys, rows, d), arena);
    arena.rewind(mark);
    if (arena.measuring() || n == 0) return;
    MOE_OMP(omp parallel for schedule(static))
    for (Index t = 0; t < n; ++t) {
      T* yt = y.row(t);
      std::copy_n(s.ys + t * d, d, yt);
      for (Index e = 1; e < n_experts(); ++e) kernels::axpy(kernels::default_arch{}, T(1), s.ys + (e * n + t) * d, yt, d);
      if constexpr (gated) {
        const T g = sigmoid(x.row(t));
        for (Index j = 0; j < d; ++j) yt[j] *= g;
      }
    }
  }

  /// Backward over all tokens: from dy writes dx and accumulates the inner bank's gradients (and w_sg's).
  void backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, Arena& arena)
    requires TrainableBank<Inner>
  {
    const Index n = x.rows(), d = d_model(), rows = n * n_experts();
    const Scratch s = carve(arena, n);
    T* dzs = arena.take<T>(gated ? n : 0);  // (n_tokens) dL/d(w_sg . x)
    const std::size_t mark = arena.used();
    if (arena.measuring() || n == 0) {
      const auto shape = MatrixView<T>::shape_only(rows, d);
      if constexpr (gated) inner_.forward(shape, nullptr, shape, arena);
      arena.rewind(mark);
      inner_.backward(shape, nullptr, shape, shape, arena);
      arena.rewind(mark);
      return;
    }
    replicate(x, s.xs);
    if constexpr (gated) {
      // Recompute the ungated sum S_t: dz_t = sigmoid'(z_t) <dy_t, S_t>, and dS_t = sigmoid(z_t) dy_t.
      inner_.forward(s.view(s.xs, rows, d), s.offsets, s.view(s.ys, rows, d), arena);
      arena.rewind(mark);
    }
    MOE_OMP(omp parallel for schedule(static))
    for (Index t = 0; t < n; ++t) {
      T g = T(1);
      if constexpr (gated) {
        g = sigmoid(x.row(t));
        T dot = 0;
        for (Index e = 0; e < n_experts(); ++e)
          for (Index j = 0; j < d; ++j) dot += dy(t, j) * s.ys[(e * n + t) * d + j];
        dzs[t] = g * (T(1) - g) * dot;
      }
      for (Index e = 0; e < n_experts(); ++e)
        for (Index j = 0; j < d; ++j) s.dys[(e * n + t) * d + j] = g * dy(t, j);
    }
    inner_.backward(s.view(s.xs, rows, d), s.offsets, s.view(s.dys, rows, d), s.view(s.ys, rows, d), arena);
    arena.rewind(mark);
    // dx_t = sum over experts, in expert order, of the inner input gradients [+ dz_t w_sg].
    MOE_OMP(omp parallel for schedule(static))
    for (Index t = 0; t < n; ++t) {
      std::copy_n(s.ys + t * d, d, dx.row(t));
      for (Index e = 1; e < n_experts(); ++e)
        kernels::axpy(kernels::default_arch{}, T(1), s.ys + (e * n + t) * d, dx.row(t), d);
      if constexpr (gated) kernels::axpy(kernels::default_arch{}, dzs[t], gate_.data(), dx.row(t), d);
    }
    if constexpr (gated)
      kernels::parallel_add_matmul_tn<T>(kernels::default_arch{}, ConstMatrixView<T>(dzs, n, 1), x, gate_.grad());
  }

 private:
  // Scratch: x repeated per expert, the inner outputs (forward) or input gradients (backward), the output
  // gradients, and offsets giving inner expert e the rows [e n, (e + 1) n).
  struct Scratch {
    T* xs;           // (n_experts * n_tokens, d_model)
    T* ys;           // (n_experts * n_tokens, d_model)
    T* dys;          // (n_experts * n_tokens, d_model)
    Index* offsets;  // (n_experts + 1)
    MatrixView<T> view(T* p, Index rows, Index cols) const {
      return p == nullptr ? MatrixView<T>::shape_only(rows, cols) : MatrixView<T>(p, rows, cols);
    }
  };

  Scratch carve(Arena& arena, Index n) const {
    const Index rows = n * n_experts(), d = d_model();
    Scratch s{arena.take<T>(rows * d), arena.take<T>(rows * d), arena.take<T>(rows * d),
              arena.take<Index>(n_experts() + 1)};
    if (s.offsets != nullptr)
      for (Index e = 0; e <= n_experts(); ++e) s.offsets[e] = e * n;
    return s;
  }

  void replicate(ConstMatrixView<T> x, T* xs) const {
    const Index n = x.rows(), d = d_model();
    MOE_OMP(omp parallel for schedule(static))
    for (Index t = 0; t < n; ++t)
      for (Index e = 0; e < n_experts(); ++e) std::copy_n(x.row(t), d, xs + (e * n + t) * d);
  }

  // sigmoid(w_sg . x) for one token row, the dot product in index order.
  T sigmoid(const T* xt) const {
    T z = 0;
    for (Index j = 0; j < d_model(); ++j) z += gate_.data()[j] * xt[j];
    return T(1) / (T(1) + std::exp(-z));
  }

  Inner inner_;
  Parameter<T> gate_;  // (1, d_model) w_sg, empty without the gate
};

}  // namespace moe::experts
