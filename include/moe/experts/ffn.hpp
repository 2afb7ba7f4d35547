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
#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/activation.hpp"
#include "../kernels/simd/bf16_gemm.hpp"
#include "../kernels/simd/int4_gemm.hpp"
#include "../kernels/simd/int8_gemm.hpp"
#include "../kernels/simd/matmul.hpp"
#include "../kernels/simd/panel_gemm.hpp"
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
/// @tparam T       scalar type of the canonical weights, activations and outputs
/// @tparam Act     activation policy (kernels::SiLU, GELU, GELUTanh, ReLU)
/// @tparam Gated   true: act(W1 x) * (W3 x) (SwiGLU with SiLU); false: act(W1 x)
/// @tparam Arch    instruction set of the kernels
/// @tparam Storage weight storage policy of the forward kernels: kernels::NativeWeights (T),
///                 kernels::BF16Weights, kernels::Int8Weights or kernels::Int4Weights<> (T = float). For a per-expert
///                 choice, put experts with different storage in different banks of one MoELayer.
///                 kernels::PackedOnly<S>: inference only, the weights live in S's panels alone (filled by pack_expert;
///                 no w1/w3/w2, init, parameters or backward), so a bf16 bank takes half the memory of f32 weights.
///
/// The canonical weights (w1/w3/w2, type T) are what users and gradients read and write; the forward pass
/// runs on panels packed from them. Every non-const access to the weights (the w1/w3/w2 accessors, init(),
/// visit_parameters and its Parameter::data()/value()) advances the weights' version; the next forward sees
/// the change and re-packs, under a lock, each expert it gives rows to before reading its panels (experts
/// without rows are packed when they first get some). Writes through a pointer or
/// view kept from an earlier access are not seen: call repack_on_next_forward() after them.
template <class T, class Act = kernels::SiLU, bool Gated = true, class Arch = kernels::default_arch,
          class Storage = kernels::NativeWeights>
class FFN {
  using Kernel = typename Storage::template kernel<T, Arch>;
  using Input = typename Kernel::Input;
  static constexpr bool converts_input = !std::is_same_v<Input, T>;

 public:
  using Scalar = T;
  using Activation = Act;
  using StoragePolicy = Storage;
  static constexpr bool gated = Gated;
  /// False with kernels::PackedOnly storage: no canonical weights, parameters or backward.
  static constexpr bool trainable = !kernels::is_packed_only<Storage>;

  /// @param cfg  shape (validated: throws moe::Error naming the bad field, or the fields whose product sizes a
  ///             buffer beyond PTRDIFF_MAX bytes); weights start at 0, call init()
  /// @param opts biases and init policy (validated)
  explicit FFN(const MoEConfig& cfg, FFNOptions opts = {})
      : d_model_(checked(cfg, opts).d_model),
        d_ff_(cfg.d_ff),
        n_experts_(cfg.n_experts),
        w1_(trainable ? n_experts_ * d_ff_ : 0, d_model_),
        w3_(Gated && trainable ? n_experts_ * d_ff_ : 0, d_model_),
        w2_(trainable ? n_experts_ * d_model_ : 0, d_ff_),
        opts_(opts),
        b1_(opts.bias ? n_experts_ : 0, d_ff_),
        b3_(opts.bias && Gated ? n_experts_ : 0, d_ff_),
        b2_(opts.bias ? n_experts_ : 0, d_model_),
        hidden_panels_(n_experts_, d_ff_, d_model_, Gated ? 2 : 1),
        out_panels_(n_experts_, d_model_, d_ff_, 1),
        pack_state_(n_experts_) {}

  Index d_model() const { return d_model_; }      ///< token width
  Index d_ff() const { return d_ff_; }            ///< hidden width
  Index n_experts() const { return n_experts_; }  ///< experts in the bank

  /// gate_proj of expert e, (d_ff, d_model). The non-const overloads count as writes (see above).
  MatrixView<T> w1(Index e) requires trainable { return {w1_.data() + e * d_ff_ * d_model_, d_ff_, d_model_}; }
  ConstMatrixView<T> w1(Index e) const requires trainable {
    return {w1_.data() + e * d_ff_ * d_model_, d_ff_, d_model_};
  }
  /// up_proj of expert e, (d_ff, d_model); gated banks only.
  MatrixView<T> w3(Index e) requires(Gated&& trainable) { return {w3_.data() + e * d_ff_ * d_model_, d_ff_, d_model_}; }
  ConstMatrixView<T> w3(Index e) const requires(Gated&& trainable) {
    return {w3_.data() + e * d_ff_ * d_model_, d_ff_, d_model_};
  }
  /// down_proj of expert e, (d_model, d_ff).
  MatrixView<T> w2(Index e) requires trainable { return {w2_.data() + e * d_model_ * d_ff_, d_model_, d_ff_}; }
  ConstMatrixView<T> w2(Index e) const requires trainable {
    return {w2_.data() + e * d_model_ * d_ff_, d_model_, d_ff_};
  }

  /// True when the bank has biases (FFNOptions::bias).
  bool has_bias() const { return opts_.bias; }
  /// The options the bank was built with.
  const FFNOptions& options() const { return opts_; }
  /// Bias of w1 (gate_proj) of expert e, (1, d_ff); banks with biases only (throws moe::Error otherwise).
  MatrixView<T> b1(Index e) { return bias_row(b1_, e); }
  /// Bias of w3 (up_proj) of expert e, (1, d_ff); gated banks with biases only.
  MatrixView<T> b3(Index e) requires Gated { return bias_row(b3_, e); }
  /// Bias of w2 (down_proj) of expert e, (1, d_model); banks with biases only.
  MatrixView<T> b2(Index e) { return bias_row(b2_, e); }

  /// The init policy of FFNOptions (default nn.Linear's U(-1/sqrt(in), 1/sqrt(in))) for each projection;
  /// biases U(-1/sqrt(in), 1/sqrt(in)) under that default, zero under any other policy (as HF does).
  void init(Rng& rng) requires trainable {
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
  void visit_parameters(F&& f) requires trainable {
    visit(*this, f);
  }
  /// The same visit read-only: f(name, const Parameter&); does not count as a write.
  template <class F>
  void visit_parameters(F&& f) const requires trainable {
    visit(*this, f);
  }
  /// No state besides the parameters.
  template <class F>
  void visit_state(F&&) requires trainable {}

  /// Marks the packed panels stale: the next forward re-packs them (each expert when it next gets rows).
  void repack_on_next_forward() requires trainable { pack_state_.forced.fetch_add(1, std::memory_order_acq_rel); }

  /// PackedOnly storage: packs expert e's gate_proj w1 and (gated) up_proj w3, each (d_ff, d_model), into the
  /// panels (w3 is ignored by a plain bank). Not concurrent with a forward. Throws moe::Error on a bad shape.
  void pack_expert_hidden(Index e, ConstMatrixView<T> w1, ConstMatrixView<T> w3 = {}) requires(!trainable) {
    check_expert(e, w1, d_ff_, d_model_, "w1");
    if constexpr (Gated) check_expert(e, w3, d_ff_, d_model_, "w3");
    const std::array<ConstMatrixView<T>, 2> sources{w1, Gated ? w3 : w1};
    hidden_panels_.pack(e, sources.data());
  }
  /// PackedOnly storage: packs expert e's down_proj w2, (d_model, d_ff).
  void pack_expert_out(Index e, ConstMatrixView<T> w2) requires(!trainable) {
    check_expert(e, w2, d_model_, d_ff_, "w2");
    out_panels_.pack(e, &w2);
  }

  /// True when expert e's packed panels hold its current canonical weights (a full comparison; for tests).
  /// Experts are packed when a forward (or backward) first gives them rows after a weight update.
  bool panels_current(Index e) const requires trainable {
    const ConstMatrixView<T> down = w2(e);
    return !stale(e) && hidden_panels_.matches(e, hidden_sources(e).data()) && out_panels_.matches(e, &down);
  }
  /// True when every expert's panels are current.
  bool panels_current() const requires trainable {
    for (Index e = 0; e < n_experts_; ++e)
      if (!panels_current(e)) return false;
    return true;
  }

  /// Runs expert e on grouped rows [offsets[e], offsets[e+1]) of xs (rows, d_model) into ys.
  /// Work items are (expert, column tile), taken dynamically with no barrier between experts: first the
  /// hidden tiles (gate and up in one pass, the activation in the epilogue), then the output tiles. Each
  /// element is computed by one thread in a fixed order, so results do not depend on the thread count.
  void forward(ConstMatrixView<T> xs, const Index* offsets, MatrixView<T> ys, Arena& arena) const {
    run_forward(xs, nullptr, offsets, ys, arena);
  }

  /// The same, with grouped row r read from token row x[row_token[r]] instead of a gathered copy: the
  /// input conversion of bf16/int8 storage runs once per token rather than once per routed slot, and f32
  /// storage reads the tokens in place. Results are bitwise those of forward() on the gathered rows.
  /// @param x (n_tokens, d_model); @param row_token (ys.rows()) token of each grouped row
  void forward_tokens(ConstMatrixView<T> x, const Index* row_token, const Index* offsets, MatrixView<T> ys,
                      Arena& arena) const {
    run_forward(x, row_token, offsets, ys, arena);
  }

  /// Backward on grouped rows: from dys (rows, d_model) writes dxs (rows, d_model) and accumulates the
  /// weight gradients. The hidden activations are recomputed from xs instead of stored by forward: one
  /// more pass over W1 (and W3), no training memory per token. Work items are experts; an expert without
  /// rows adds nothing, so its gradient stays exactly as it was (0 after zero_grad). Gradients are those of
  /// the canonical weights: with bf16/int8 storage the forward's rounding is not differentiated
  /// (straight-through).
  void backward(ConstMatrixView<T> xs, const Index* offsets, ConstMatrixView<T> dys, MatrixView<T> dxs,
                Arena& arena) requires trainable {
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
    if constexpr (k_panels_hold_weights) ensure_packed(offsets);

    const double work = double(n_rows) * double(d_ff_) * double(d_model_);
    MOE_OMP(omp parallel for schedule(dynamic) if(work >= detail::k_parallel_min_work))
    for (Index e = 0; e < n_experts_; ++e) {
      const Index r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      const auto x = xs.middle_rows(r0, n);    // (n, d_model)
      const auto dy = dys.middle_rows(r0, n);  // (n, d_model)
      const MatrixView<T> g(gate + r0 * d_ff_, n, d_ff_), h(hidden + r0 * d_ff_, n, d_ff_);
      const MatrixView<T> u = Gated ? MatrixView<T>(up + r0 * d_ff_, n, d_ff_) : MatrixView<T>();
      recompute_pre_activations(e, x, g, u);
      detail::activate_rows<Act, Gated, Arch, T>(g, u, h);
      detail::linear_backward<Arch, T>(dy, h, {}, dw2.middle_rows(e * d_model_, d_model_), bias_of(db2, e), {});
      detail::set_zero(h);
      detail::linear_backward<Arch, T>(dy, {}, self.w2(e), {}, nullptr, h);  // dh = dy W2   (n, d_ff)
      detail::activation_backward<Act, Gated, T>(h, g, u);
      const auto dx = dxs.middle_rows(r0, n);  // (n, d_model)
      detail::set_zero(dx);
      // dx = dg W1 [+ du W3]; dW1 += dg^T x; dW3 += du^T x
      detail::linear_backward<Arch, T>(g, x, self.w1(e), dw1.middle_rows(e * d_ff_, d_ff_), bias_of(db1, e), dx);
      if constexpr (Gated)
        detail::linear_backward<Arch, T>(u, x, self.w3(e), dw3.middle_rows(e * d_ff_, d_ff_), bias_of(db3, e), dx);
    }
  }

 private:
  // forward() (row_token == nullptr: x holds the grouped rows) and forward_tokens().
  void run_forward(ConstMatrixView<T> x, const Index* row_token, const Index* offsets, MatrixView<T> ys,
                   Arena& arena) const {
    using Rows = kernels::PanelRows<Input>;
    const Index n_rows = ys.rows(), n_in = row_token != nullptr ? x.rows() : n_rows;
    const Index kx = hidden_panels_.padded_k(), kh = out_panels_.padded_k();
    Input* x_in = arena.take<Input>(converts_input ? n_in * kx : 0);          // (n_in, kx) x in the kernel's input type
    float* x_scale = arena.take<float>(Kernel::row_scaled ? n_in : 0);        // (n_in) per-row scales of x_in
    T* hidden = arena.take<T>(converts_input && !Kernel::row_scaled ? 0 : n_rows * d_ff_);  // (rows, d_ff)
    Input* h_in = arena.take<Input>(converts_input ? n_rows * kh : 0);        // (rows, kh) hidden, kernel input type
    float* h_scale = arena.take<float>(Kernel::row_scaled ? n_rows : 0);      // (rows) per-row scales of h_in
    if (arena.measuring() || n_rows == 0) return;
    ensure_packed(offsets);

    const Index h_cols = hidden_panels_.columns_per_source();
    const Index h_per_item = std::max<Index>(1, k_item_cols / h_cols);
    const Index o_per_item = std::max<Index>(1, k_item_cols / Kernel::width);
    const Rows x_rows = converts_input ? Rows{x_in, kx, row_token, x_scale}
                                       : Rows{reinterpret_cast<const Input*>(x.data()), x.stride(), row_token, nullptr};
    const Rows h_rows = converts_input ? Rows{h_in, kh, nullptr, h_scale}
                                       : Rows{reinterpret_cast<const Input*>(hidden), d_ff_, nullptr, nullptr};

    const double work = double(n_rows) * double(d_ff_) * double(d_model_);
    MOE_OMP(omp parallel if(work >= detail::k_parallel_min_work))
    {
      if constexpr (converts_input) {
        // Once per input row, before any expert reads it.
        MOE_OMP(omp for schedule(static) nowait)
        for (Index r = 0; r < n_in; ++r) {
          const float s = Kernel::encode_row(x.row(r), d_model_, kx, x_in + r * kx);
          if constexpr (Kernel::row_scaled) x_scale[r] = s;
        }
        if constexpr (!Kernel::row_scaled) {
          MOE_OMP(omp for schedule(static))
          for (Index r = 0; r < n_rows; ++r)
            std::fill(h_in + r * kh + d_ff_, h_in + (r + 1) * kh, Input(0));  // step padding of the hidden row
        } else {
          MOE_OMP(omp barrier)
        }
      }

      for_each_item(offsets, h_per_item, hidden_panels_.panels(), [&](Index e, Index r0, Index n, Index p0, Index p1) {
        kernels::panel_gemm(hidden_panels_, e, p0, p1, x_rows.from(r0), n,
                            [&](Index i0, Index rows, Index j, const typename Kernel::Out* tile) {
                              hidden_epilogue(tile, rows, e, j * h_cols, r0 + i0, hidden, h_in, kh);
                            });
      });

      if constexpr (Kernel::row_scaled) {
        // The per-row scale needs the whole hidden row, so this waits for every hidden tile.
        MOE_OMP(omp for schedule(static))
        for (Index r = 0; r < n_rows; ++r) h_scale[r] = Kernel::encode_row(hidden + r * d_ff_, d_ff_, kh, h_in + r * kh);
      }

      for_each_item(offsets, o_per_item, out_panels_.panels(), [&](Index e, Index r0, Index n, Index p0, Index p1) {
        kernels::panel_gemm(out_panels_, e, p0, p1, h_rows.from(r0), n,
                            [&](Index i0, Index rows, Index j, const typename Kernel::Out* tile) {
                              const Index c0 = j * Kernel::width, nc = std::min(Kernel::width, d_model_ - c0);
                              const T* b2 = bias_of(b2_, e);
                              for (Index i = 0; i < rows; ++i) {
                                T* y = ys.row(r0 + i0 + i) + c0;
                                std::copy_n(tile + i * Kernel::width, nc, y);
                                if (b2 != nullptr) kernels::axpy(Arch{}, T(1), b2 + c0, y, nc);
                              }
                            });
      });
    }
  }

  // The forward's panels hold the canonical weights exactly (f32/f64 storage): backward can run on them.
  static constexpr bool k_panels_hold_weights = std::is_same_v<Input, T> && !Kernel::quantized;

  // g = x W1ᵀ + b1 and (gated) u = x W3ᵀ + b3 on expert e's rows x: on the packed panels when they hold the
  // weights (the forward's values bit for bit, at the forward's speed), else from the canonical weights.
  void recompute_pre_activations(Index e, ConstMatrixView<T> x, MatrixView<T> g, MatrixView<T> u) const {
    if constexpr (k_panels_hold_weights) {
      const Index half = hidden_panels_.columns_per_source();
      kernels::panel_gemm(hidden_panels_, e, 0, hidden_panels_.panels(),
                          kernels::PanelRows<Input>{x.data(), x.stride(), nullptr, nullptr}, x.rows(),
                          [&](Index i0, Index rows, Index j, const T* tile) {
                            const Index c0 = j * half, nc = std::min(half, d_ff_ - c0);
                            for (Index i = 0; i < rows; ++i) {
                              std::copy_n(tile + i * Kernel::width, nc, g.row(i0 + i) + c0);
                              if constexpr (Gated) std::copy_n(tile + i * Kernel::width + half, nc, u.row(i0 + i) + c0);
                            }
                          });
      for (const auto& [bias, out] : {std::pair{bias_of(b1_, e), g}, std::pair{Gated ? bias_of(b3_, e) : nullptr, u}}) {
        if (bias != nullptr)
          for (Index i = 0; i < out.rows(); ++i) kernels::axpy(Arch{}, T(1), bias, out.row(i), d_ff_);
      }
    } else {
      detail::linear<Arch, T>(x, w1(e), bias_of(b1_, e), g);
      if constexpr (Gated) detail::linear<Arch, T>(x, w3(e), bias_of(b3_, e), u);
    }
  }

  // Output columns per work item: enough items to balance two or more threads on one expert (decode),
  // few enough that each streams a long run of panels while its rows stay in cache.
  static constexpr Index k_item_cols = 128;

  // Per expert, the version its panels were packed at; the count of forced re-packs; the lock that packing
  // takes. A copy of the bank owns copied panels, so it copies the state too (with a fresh lock).
  struct PackState {
    static constexpr std::uint64_t k_never = ~std::uint64_t{0};
    mutable std::mutex lock;
    mutable std::vector<std::atomic<std::uint64_t>> packed;  // (n_experts)
    std::atomic<std::uint64_t> forced{0};
    explicit PackState(Index n_experts) : packed(static_cast<std::size_t>(n_experts)) {
      for (auto& v : packed) v.store(k_never, std::memory_order_relaxed);
    }
    PackState(const PackState& o) : packed(o.packed.size()), forced(o.forced.load()) {
      for (std::size_t e = 0; e < packed.size(); ++e) packed[e].store(o.packed[e].load());
    }
    PackState& operator=(const PackState& o) {
      PackState copy(o);
      packed.swap(copy.packed);
      forced.store(copy.forced.load());
      return *this;
    }
  };

  // What current panels were packed at: versions and forced re-packs only grow, so the sum changes
  // whenever one of them does.
  std::uint64_t pack_target() const {
    return w1_.version() + w3_.version() + w2_.version() + pack_state_.forced.load(std::memory_order_acquire);
  }
  bool stale(Index e) const {
    if constexpr (!trainable)
      return false;  // packed by pack_expert_*, never from canonical weights
    else
      return pack_state_.packed[static_cast<std::size_t>(e)].load(std::memory_order_acquire) != pack_target();
  }

  // f(e, r0, n, p0, p1) for every work item (expert e with rows [r0, r0 + n), panels [p0, p1)), taken
  // dynamically with no barrier between experts. A worksharing loop: call it inside a parallel region.
  template <class F>
  void for_each_item(const Index* offsets, Index per_item, Index n_panels, F&& f) const {
    const Index n_items = (n_panels + per_item - 1) / per_item;
    MOE_OMP(omp for schedule(dynamic) collapse(2))
    for (Index e = 0; e < n_experts_; ++e) {
      for (Index item = 0; item < n_items; ++item) {
        const Index r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        f(e, r0, n, item * per_item, std::min((item + 1) * per_item, n_panels));
      }
    }
  }

  std::array<ConstMatrixView<T>, 2> hidden_sources(Index e) const {
    if constexpr (Gated) {
      return {w1(e), w3(e)};
    } else {
      return {w1(e), w1(e)};
    }
  }

  // Packs the stale experts among those with rows in `offsets`, under the lock (double-checked: the common
  // path is one atomic load per expert). Experts without rows wait: after a weight update a decode step
  // re-packs only the experts it routes to.
  void ensure_packed(const Index* offsets) const {
    if constexpr (trainable) {  // PackedOnly panels come from pack_expert_*
      auto needs = [&](Index e) { return offsets[e + 1] > offsets[e] && stale(e); };
      Index n_stale = 0;
      for (Index e = 0; e < n_experts_; ++e) n_stale += needs(e) ? 1 : 0;
      if (n_stale == 0) return;
      std::lock_guard<std::mutex> guard(pack_state_.lock);
      const std::uint64_t target = pack_target();
      MOE_OMP(omp parallel for schedule(dynamic)
                  if(double(n_stale) * double(d_ff_) * double(d_model_) >= detail::k_parallel_min_work))
      for (Index e = 0; e < n_experts_; ++e) {
        if (!needs(e)) continue;
        hidden_panels_.pack(e, hidden_sources(e).data());
        const ConstMatrixView<T> down = w2(e);
        out_panels_.pack(e, &down);
        pack_state_.packed[static_cast<std::size_t>(e)].store(target, std::memory_order_release);
      }
    }
  }

  void check_expert(Index e, ConstMatrixView<T> w, Index rows, Index cols, const char* what) const {
    moe::detail::require(e >= 0 && e < n_experts_, "moe::experts::FFN::pack_expert: expert ", e, " of ", n_experts_);
    moe::detail::require(w.rows() == rows && w.cols() == cols, "moe::experts::FFN::pack_expert: ", what, " is (",
                         w.rows(), ", ", w.cols(), "), expected (", rows, ", ", cols, ")");
  }

  // visit_parameters for FFN and const FFN.
  template <class Self, class F>
  static void visit(Self& self, F& f) {
    f(std::string_view("w1"), self.w1_);
    if constexpr (Gated) f(std::string_view("w3"), self.w3_);
    f(std::string_view("w2"), self.w2_);
    if (!self.opts_.bias) return;
    f(std::string_view("b1"), self.b1_);
    if constexpr (Gated) f(std::string_view("b3"), self.b3_);
    f(std::string_view("b2"), self.b2_);
  }

  MatrixView<T> bias_row(Parameter<T>& b, Index e) {
    moe::detail::require(e >= 0 && e < b.rows(), "moe::experts::FFN: no bias for expert ", e,
                         " (construct with FFNOptions{.bias = true})");
    return b.value().middle_rows(e, 1);
  }
  // Expert e's row of a bias or bias gradient, nullptr when the bank has none.
  static const T* bias_of(const Parameter<T>& b, Index e) { return b.rows() == 0 ? nullptr : b.data() + e * b.cols(); }
  static T* bias_of(MatrixView<T> b, Index e) { return b.rows() == 0 ? nullptr : b.row(e); }

  // Hidden tile (rows, width) of panel columns starting at hidden column c0: gate in the first half, up in
  // the second (gated); activated into `hidden` rows, or encoded straight into the kernel's input rows when
  // the encoding needs no whole-row scale.
  void hidden_epilogue(const typename Kernel::Out* tile, Index rows, Index e, Index c0, Index row0, T* hidden,
                       Input* h_in, Index kh) const {
    using O = typename Kernel::Out;
    const Index half = hidden_panels_.columns_per_source(), nc = std::min(half, d_ff_ - c0);
    alignas(64) O act[Kernel::width];     // (half) one activated row of the tile
    alignas(64) O biased[Kernel::width];  // (width) the tile row plus the biases, when the bank has them
    const T* b1 = bias_of(b1_, e);
    const T* b3 = Gated ? bias_of(b3_, e) : nullptr;
    for (Index i = 0; i < rows; ++i) {
      const O* g = tile + i * Kernel::width;  // (half) gate, then (half) up
      if (b1 != nullptr) {
        for (Index j = 0; j < nc; ++j) biased[j] = g[j] + O(b1[c0 + j]);
        if constexpr (Gated)
          for (Index j = 0; j < nc; ++j) biased[half + j] = g[half + j] + O(b3[c0 + j]);
        g = biased;
      }
      O* out = converts_input && !Kernel::row_scaled ? act : reinterpret_cast<O*>(hidden + (row0 + i) * d_ff_ + c0);
      if constexpr (Gated) {
        kernels::gated_activate<Act>(Arch{}, g, g + half, out, nc);
      } else {
        kernels::activate<Act>(Arch{}, g, out, nc);
      }
      if constexpr (converts_input && !Kernel::row_scaled) Kernel::encode_row(act, nc, nc, h_in + (row0 + i) * kh + c0);
    }
  }

  // cfg and opts validated, and every buffer the shape sizes checked before one is allocated.
  static const MoEConfig& checked(const MoEConfig& cfg, const FFNOptions& opts) {
    constexpr const char* who = "moe::experts::FFN";
    cfg.validate();
    moe::detail::require(trainable || !opts.bias, who, ": PackedOnly storage takes no biases (opts.bias)");
    validated_init<T>(opts.init, who, "opts.init");
    moe::detail::checked_size<T>(who, "n_experts * d_ff * d_model", {cfg.n_experts, cfg.d_ff, cfg.d_model});
    kernels::PackedWeights<Kernel>::elements(
        who, "the packed w1/w3 panels, n_experts * ceil(d_ff / columns) * steps(d_model) * width * group",
        cfg.n_experts, cfg.d_ff, cfg.d_model, Gated ? 2 : 1);
    kernels::PackedWeights<Kernel>::elements(
        who, "the packed w2 panels, n_experts * ceil(d_model / columns) * steps(d_ff) * width * group",
        cfg.n_experts, cfg.d_model, cfg.d_ff, 1);
    return cfg;
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
  // Forward-only copies of the weights in the kernel's panel layout, derived from w1_/w3_/w2_.
  mutable kernels::PackedWeights<Kernel> hidden_panels_;  // (n_experts, ...) w1 (and w3) panels
  mutable kernels::PackedWeights<Kernel> out_panels_;     // (n_experts, ...) w2 panels
  PackState pack_state_;
};

/// SwiGLU experts (Mixtral, Qwen, DeepSeek).
template <class T, class Arch = kernels::default_arch>
using SwiGLU = FFN<T, kernels::SiLU, true, Arch>;

}  // namespace moe::experts
