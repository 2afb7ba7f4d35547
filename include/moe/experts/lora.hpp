#pragma once
/// @file experts/lora.hpp
/// @brief LoRA experts (LLaVA-MoLE, arXiv 2401.16160): one frozen base FFN shared by the whole bank, and
/// per expert a low-rank adapter on each of its projections,
///   W' = W + (alpha / r) B_e A_e,  A_e (r, in), B_e (out, r),
/// so expert e computes y = W2'_e (act(W1'_e x) * (W3'_e x)) (gated) or W2'_e act(W1'_e x) (plain).
/// MoLE puts its LoRA experts in the MLP of every decoder block, on gate/up/down (PAPERS.md A.10, E.4).
/// An X-LoRA-style dense mixture (every adapter, weighted per token) is this bank under a dense router.
///
/// Gradients flow to A, B and the input; the base gets none unless LoRAOptions::train_base is set.

#include <algorithm>
#include <limits>
#include <span>
#include <string_view>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/activation.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../workspace.hpp"
#include "detail/dense.hpp"
#include "init.hpp"

namespace moe::experts {

/// Shape and training knobs of a LoRA bank.
struct LoRAOptions {
  Index rank = 8;                     ///< r, the adapters' inner width (>= 1)
  double alpha = 16;                  ///< the delta is scaled by alpha / rank (LLaVA-1.5: r = 128, alpha = 256);
                                      ///< finite, > 0, alpha / rank a finite T
  bool train_base = false;            ///< true: the shared base also receives gradients
  InitPolicy base_init = UniformFanIn{};  ///< the base projections (normally loaded from a checkpoint)
  InitPolicy a_init = UniformFanIn{};     ///< A: PEFT's kaiming_uniform(a = sqrt 5), i.e. U(+-1/sqrt(in))
  InitPolicy b_init = Zeros{};            ///< B: zero, so an untrained adapter leaves the base unchanged
};

/// Per-expert low-rank adapters of one projection in -> out: A_e (rank, in), B_e (out, rank), scale s.
/// The bank calls it inside its per-expert work items; it owns no threads.
template <class T, class Arch = kernels::default_arch>
class LoRAAdapter {
 public:
  /// Gradient views, fetched once outside the parallel region (fetching allocates on first use).
  struct Grads {
    MatrixView<T> a;  ///< (n_experts * rank, in)
    MatrixView<T> b;  ///< (n_experts * out, rank)
  };

  /// @param n_experts experts; @param in, out projection shape; @param rank r; @param scale alpha / r
  LoRAAdapter(Index n_experts, Index in, Index out, Index rank, T scale)
      : in_(in), out_(out), rank_(rank), scale_(scale), a_(n_experts * rank, in), b_(n_experts * out, rank) {}

  Index rank() const { return rank_; }  ///< r
  T scale() const { return scale_; }    ///< alpha / r

  /// A of expert e, (rank, in).
  MatrixView<T> a(Index e) { return a_.value().middle_rows(e * rank_, rank_); }
  ConstMatrixView<T> a(Index e) const { return a_.value().middle_rows(e * rank_, rank_); }
  /// B of expert e, (out, rank).
  MatrixView<T> b(Index e) { return b_.value().middle_rows(e * out_, out_); }
  ConstMatrixView<T> b(Index e) const { return b_.value().middle_rows(e * out_, out_); }

  /// Fills A and B with their policies.
  void init(Rng& rng, const InitPolicy& a_init, const InitPolicy& b_init) {
    initialize(rng, a_init, a_, in_);
    initialize(rng, b_init, b_, rank_);
  }

  /// Calls f(prefix + ".lora_a", A) and f(prefix + ".lora_b", B) (Hugging Face PEFT naming).
  template <class F>
  void visit_parameters(std::string_view a_name, std::string_view b_name, F&& f) {
    f(a_name, a_);
    f(b_name, b_);
  }

  Grads grads() { return {a_.grad(), b_.grad()}; }

  /// t = s x A_e^T: the scaled low-rank code of rows x (n, in) into t (n, rank).
  void project(Index e, ConstMatrixView<T> x, MatrixView<T> t) const {
    kernels::matmul_nt(Arch{}, x, a(e), t);
    for (Index i = 0; i < t.rows(); ++i)
      for (Index j = 0; j < rank_; ++j) t(i, j) *= scale_;
  }

  /// y += t B_e^T with t from project(); tmp (n, out) is scratch.
  void expand_add(Index e, ConstMatrixView<T> t, MatrixView<T> tmp, MatrixView<T> y) const {
    kernels::matmul_nt(Arch{}, t, b(e), tmp);
    detail::add_rows<Arch, T>(tmp, y);
  }

  /// Backward of y += s (x A_e^T) B_e^T given t = project(e, x): dB_e += dy^T t, dA_e += s (dy B_e)^T x,
  /// dx += s (dy B_e) A_e. dt (n, rank) is scratch.
  void backward(Index e, const Grads& g, ConstMatrixView<T> x, ConstMatrixView<T> t, ConstMatrixView<T> dy,
                MatrixView<T> dt, MatrixView<T> dx) const {
    detail::set_zero(dt);
    detail::linear_backward<Arch, T>(dy, t, b(e), g.b.middle_rows(e * out_, out_), nullptr, dt);
    for (Index i = 0; i < dt.rows(); ++i)
      for (Index j = 0; j < rank_; ++j) dt(i, j) *= scale_;
    detail::linear_backward<Arch, T>(dt, x, a(e), g.a.middle_rows(e * rank_, rank_), nullptr, dx);
  }

 private:
  Index in_;
  Index out_;
  Index rank_;
  T scale_;
  Parameter<T> a_;  // (n_experts * rank, in)
  Parameter<T> b_;  // (n_experts * out, rank)
};

/// A bank of LoRA experts over one shared base FFN.
/// @tparam T     scalar type
/// @tparam Act   activation policy (kernels::SiLU, GELU, GELUTanh, ReLU)
/// @tparam Gated true: act(W1' x) * (W3' x); false: act(W1' x)
/// @tparam Arch  instruction set of the kernels
template <class T, class Act = kernels::SiLU, bool Gated = true, class Arch = kernels::default_arch>
class LoRA {
 public:
  using Scalar = T;
  using Activation = Act;
  static constexpr bool gated = Gated;

  /// @param cfg  shape (d_model, d_ff, n_experts; validated)
  /// @param opts rank, alpha, whether the base trains, init policies; throws moe::Error naming a bad field (rank
  ///             < 1, alpha not finite and > 0) or the fields whose product sizes a buffer beyond PTRDIFF_MAX bytes
  explicit LoRA(const MoEConfig& cfg, LoRAOptions opts = {})
      : d_model_(cfg.validated().d_model),
        d_ff_(cfg.d_ff),
        n_experts_(cfg.n_experts),
        opts_(checked(cfg, opts)),
        w1_(d_ff_, d_model_),
        w3_(Gated ? d_ff_ : 0, d_model_),
        w2_(d_model_, d_ff_),
        lora1_(n_experts_, d_model_, d_ff_, opts.rank, scale(opts)),
        lora3_(Gated ? n_experts_ : 0, d_model_, d_ff_, opts.rank, scale(opts)),
        lora2_(n_experts_, d_ff_, d_model_, opts.rank, scale(opts)) {}

  Index d_model() const { return d_model_; }      ///< token width
  Index d_ff() const { return d_ff_; }            ///< hidden width of the base FFN
  Index n_experts() const { return n_experts_; }  ///< experts (adapters per projection)
  Index rank() const { return opts_.rank; }       ///< r
  bool train_base() const { return opts_.train_base; }  ///< whether the base receives gradients

  /// The shared base gate_proj (d_ff, d_model), up_proj (d_ff, d_model; gated only), down_proj (d_model, d_ff).
  MatrixView<T> w1() { return w1_.value(); }
  ConstMatrixView<T> w1() const { return w1_.value(); }
  MatrixView<T> w3() requires Gated { return w3_.value(); }
  ConstMatrixView<T> w3() const requires Gated { return w3_.value(); }
  MatrixView<T> w2() { return w2_.value(); }
  ConstMatrixView<T> w2() const { return w2_.value(); }
  /// The adapters of w1 (d_model -> d_ff), w3 (gated only) and w2 (d_ff -> d_model).
  LoRAAdapter<T, Arch>& w1_lora() { return lora1_; }
  const LoRAAdapter<T, Arch>& w1_lora() const { return lora1_; }
  LoRAAdapter<T, Arch>& w3_lora() requires Gated { return lora3_; }
  const LoRAAdapter<T, Arch>& w3_lora() const requires Gated { return lora3_; }
  LoRAAdapter<T, Arch>& w2_lora() { return lora2_; }
  const LoRAAdapter<T, Arch>& w2_lora() const { return lora2_; }

  /// Base with opts.base_init, then each adapter's A and B with opts.a_init and opts.b_init.
  void init(Rng& rng) {
    initialize(rng, opts_.base_init, w1_, d_model_);
    initialize(rng, opts_.base_init, w3_, d_model_);
    initialize(rng, opts_.base_init, w2_, d_ff_);
    lora1_.init(rng, opts_.a_init, opts_.b_init);
    lora3_.init(rng, opts_.a_init, opts_.b_init);
    lora2_.init(rng, opts_.a_init, opts_.b_init);
  }

  /// The trainable tensors: "w1.lora_a" (n_experts * rank, d_model), "w1.lora_b" (n_experts * d_ff, rank),
  /// "w3.lora_a", "w3.lora_b" (gated only), "w2.lora_a" (n_experts * rank, d_ff), "w2.lora_b"
  /// (n_experts * d_model, rank); then the base "w1", "w3", "w2" only when train_base().
  template <class F>
  void visit_parameters(F&& f) {
    lora1_.visit_parameters("w1.lora_a", "w1.lora_b", f);
    if constexpr (Gated) lora3_.visit_parameters("w3.lora_a", "w3.lora_b", f);
    lora2_.visit_parameters("w2.lora_a", "w2.lora_b", f);
    if (opts_.train_base) visit_base(f);
  }

  /// State: the frozen base "w1", "w3", "w2" as f(name, std::span<T>) when !train_base() (loaded from a
  /// checkpoint, never trained); nothing otherwise (the base is then a parameter).
  template <class F>
  void visit_state(F&& f) {
    if (opts_.train_base) return;
    visit_base([&](std::string_view name, Parameter<T>& p) {
      f(name, std::span<T>(p.data(), static_cast<std::size_t>(p.rows() * p.cols())));
    });
  }

  /// Runs expert e on grouped rows [offsets[e], offsets[e+1]) of xs (rows, d_model) into ys.
  /// Work items are experts, each computed by one thread in a fixed order.
  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    const Index n_rows = xs.rows(), wide = std::max(d_ff_, d_model_), r = opts_.rank;
    T* gate = arena.take<T>(n_rows * d_ff_);             // (rows, d_ff) W1' x, then the hidden layer
    T* up = arena.take<T>(Gated ? n_rows * d_ff_ : 0);  // (rows, d_ff) W3' x
    T* code = arena.take<T>(n_rows * r);                 // (rows, rank) s A x
    T* tmp = arena.take<T>(n_rows * wide);               // (rows, max(d_ff, d_model)) B (s A x)
    if (arena.measuring() || n_rows == 0) return;

    MOE_OMP(omp parallel for schedule(dynamic)
                if(double(n_rows) * double(d_ff_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const auto x = xs.middle_rows(r0, n);  // (n, d_model)
      const Rows rows{r0, n, r, wide, code, tmp};
      const MatrixView<T> g(gate + r0 * d_ff_, n, d_ff_);  // (n, d_ff)
      adapted(lora1_, e, x, w1_.value(), rows, g);
      MatrixView<T> u;
      if constexpr (Gated) {
        u = MatrixView<T>(up + r0 * d_ff_, n, d_ff_);  // (n, d_ff)
        adapted(lora3_, e, x, w3_.value(), rows, u);
      }
      detail::activate_rows<Act, Gated, Arch, T>(g, u, g);
      adapted(lora2_, e, g, w2_.value(), rows, ys.middle_rows(r0, n));
    }
  }

  /// Backward on grouped rows: from dys writes dxs and accumulates the adapters' gradients (and the base's
  /// when train_base()). The forward is recomputed from xs. An expert without rows adds nothing. The base
  /// gradient sums over all the bank's rows after the per-expert pass, in fixed row chunks.
  void backward(ConstMatrixView<T> xs, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs,
                Arena& arena) {
    const Index n_rows = xs.rows(), wide = std::max(d_ff_, d_model_), r = opts_.rank;
    T* gate = arena.take<T>(n_rows * d_ff_);             // (rows, d_ff) W1' x, then dL/d(W1' x)
    T* up = arena.take<T>(Gated ? n_rows * d_ff_ : 0);  // (rows, d_ff) W3' x, then dL/d(W3' x)
    T* hidden = arena.take<T>(n_rows * d_ff_);           // (rows, d_ff) act(W1' x) [* W3' x]
    T* dhidden = arena.take<T>(n_rows * d_ff_);          // (rows, d_ff) dL/dhidden
    T* codes = arena.take<T>(3 * n_rows * r);            // 3 x (rows, rank) s A x of w1, w3, w2
    T* dcode = arena.take<T>(n_rows * r);                // (rows, rank) dL/d(s A x)
    T* tmp = arena.take<T>(n_rows * wide);               // (rows, max(d_ff, d_model))
    if (arena.measuring() || n_rows == 0) return;
    // Gradients are allocated here, outside the parallel region.
    const auto g1 = lora1_.grads(), g2 = lora2_.grads();
    const auto g3 = Gated ? lora3_.grads() : typename LoRAAdapter<T, Arch>::Grads{};
    const LoRA& self = *this;

    MOE_OMP(omp parallel for schedule(dynamic)
                if(double(n_rows) * double(d_ff_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const auto x = xs.middle_rows(r0, n);    // (n, d_model)
      const auto dy = dys.middle_rows(r0, n);  // (n, d_model)
      const auto dx = dxs.middle_rows(r0, n);  // (n, d_model)
      const MatrixView<T> g(gate + r0 * d_ff_, n, d_ff_), h(hidden + r0 * d_ff_, n, d_ff_),
          dh(dhidden + r0 * d_ff_, n, d_ff_);  // (n, d_ff) each
      const MatrixView<T> u = Gated ? MatrixView<T>(up + r0 * d_ff_, n, d_ff_) : MatrixView<T>();
      const MatrixView<T> t1(codes + r0 * r, n, r), t3(codes + (n_rows + r0) * r, n, r),
          t2(codes + (2 * n_rows + r0) * r, n, r), dt(dcode + r0 * r, n, r);  // (n, rank) each
      const Rows rows{r0, n, r, wide, nullptr, tmp};
      // Recompute the forward, keeping the codes.
      self.adapted(lora1_, e, x, w1_.value(), rows, g, t1);
      if constexpr (Gated) self.adapted(lora3_, e, x, w3_.value(), rows, u, t3);
      detail::activate_rows<Act, Gated, Arch, T>(g, u, h);
      lora2_.project(e, h, t2);
      // Down projection: dh = dy W2 + s (dy B2) A2.
      detail::set_zero(dh);
      detail::linear_backward<Arch, T>(dy, h, w2_.value(), {}, nullptr, dh);
      lora2_.backward(e, g2, h, t2, dy, dt, dh);
      detail::activation_backward<Act, Gated, T>(dh, g, u);
      // Gate and up projections: dx = dg W1' [+ du W3'].
      detail::set_zero(dx);
      detail::linear_backward<Arch, T>(g, x, w1_.value(), {}, nullptr, dx);
      lora1_.backward(e, g1, x, t1, g, dt, dx);
      if constexpr (Gated) {
        detail::linear_backward<Arch, T>(u, x, w3_.value(), {}, nullptr, dx);
        lora3_.backward(e, g3, x, t3, u, dt, dx);
      }
    }
    if (!opts_.train_base) return;
    const Index r0 = offsets[0], n = offsets[n_experts_] - r0;
    const auto x = xs.middle_rows(r0, n);
    kernels::parallel_add_matmul_tn<T>(Arch{}, dys.middle_rows(r0, n),
                                       ConstMatrixView<T>(hidden + r0 * d_ff_, n, d_ff_), w2_.grad());
    kernels::parallel_add_matmul_tn<T>(Arch{}, ConstMatrixView<T>(gate + r0 * d_ff_, n, d_ff_), x, w1_.grad());
    if constexpr (Gated)
      kernels::parallel_add_matmul_tn<T>(Arch{}, ConstMatrixView<T>(up + r0 * d_ff_, n, d_ff_), x, w3_.grad());
  }

 private:
  // Scratch of one expert's rows: the rows [r0, r0 + n), and the code / product buffers they index.
  struct Rows {
    Index r0, n, rank, wide;
    T* code;  // (rows, rank) or nullptr when the caller keeps the code elsewhere
    T* tmp;   // (rows, wide)
  };

  // out = x W^T + s (x A_e^T) B_e^T; the code s x A_e^T lands in `code` (n, rank).
  void adapted(const LoRAAdapter<T, Arch>& lora, Index e, ConstMatrixView<T> x, ConstMatrixView<T> w,
               const Rows& rows, MatrixView<T> out, MatrixView<T> code) const {
    detail::linear<Arch, T>(x, w, nullptr, out);
    lora.project(e, x, code);
    lora.expand_add(e, code, MatrixView<T>(rows.tmp + rows.r0 * rows.wide, rows.n, out.cols(), rows.wide), out);
  }
  void adapted(const LoRAAdapter<T, Arch>& lora, Index e, ConstMatrixView<T> x, ConstMatrixView<T> w,
               const Rows& rows, MatrixView<T> out) const {
    adapted(lora, e, x, w, rows, out, MatrixView<T>(rows.code + rows.r0 * rows.rank, rows.n, rows.rank));
  }

  template <class F>
  void visit_base(F&& f) {
    f(std::string_view("w1"), w1_);
    if constexpr (Gated) f(std::string_view("w3"), w3_);
    f(std::string_view("w2"), w2_);
  }

  // The options validated, and every buffer the shape and rank size checked before one is allocated.
  static const LoRAOptions& checked(const MoEConfig& cfg, const LoRAOptions& o) {
    constexpr const char* who = "moe::experts::LoRA";
    moe::detail::require(o.rank >= 1, who, ": opts.rank = ", o.rank, " must be >= 1");
    // alpha / rank is the scale, a T: alpha up to max(T) · rank.
    moe::detail::require_in(o.alpha, {.lo = 0.0, .hi = static_cast<double>(std::numeric_limits<T>::max()) *
                                                           static_cast<double>(o.rank), .open_lo = true},
                            who, "opts.alpha");
    validated_init<T>(o.base_init, who, "opts.base_init");
    validated_init<T>(o.a_init, who, "opts.a_init");
    validated_init<T>(o.b_init, who, "opts.b_init");
    moe::detail::checked_size<T>(who, "d_ff * d_model", {cfg.d_ff, cfg.d_model});
    // A (n_experts * rank, in) and B (n_experts * out, rank) of the d_model -> d_ff and d_ff -> d_model adapters.
    moe::detail::checked_size<T>(who, "n_experts * opts.rank * max(d_model, d_ff)",
                                 {cfg.n_experts, o.rank, std::max(cfg.d_model, cfg.d_ff)});
    return o;
  }
  static T scale(const LoRAOptions& o) { return static_cast<T>(o.alpha / static_cast<double>(o.rank)); }

  Index d_model_;
  Index d_ff_;
  Index n_experts_;
  LoRAOptions opts_;
  Parameter<T> w1_;  // (d_ff, d_model) shared base gate_proj
  Parameter<T> w3_;  // (d_ff, d_model) shared base up_proj, empty unless Gated
  Parameter<T> w2_;  // (d_model, d_ff) shared base down_proj
  LoRAAdapter<T, Arch> lora1_;  // d_model -> d_ff
  LoRAAdapter<T, Arch> lora3_;  // d_model -> d_ff, no experts unless Gated
  LoRAAdapter<T, Arch> lora2_;  // d_ff -> d_model
};

/// MoLE's experts: LoRA adapters on a SwiGLU base.
template <class T, class Arch = kernels::default_arch>
using LoRASwiGLU = LoRA<T, kernels::SiLU, true, Arch>;

}  // namespace moe::experts
