#pragma once
/// @file routers/dense_to_sparse.hpp
/// @brief DenseToSparseGate: EvoMoE's DTS gate (PAPERS.md A.4 and E.3; official code `topkgate.py`).
///
/// Training, soft phase: G = softmax((z + ε) / τ) with z = W_g x and ε ~ Gumbel(0, 1); every expert with
/// G_i > γ (default 0.001) is active, so a token uses a variable number of slots: top_k() is the most it
/// may use (the most active, by descending G, ties: lower id), unused slots are id -1 with weight 0. As τ
/// decays (exponential or linear schedule from max_temperature to min_temperature) fewer experts pass γ.
/// From hard_switch_step on (hard phase) a token takes the argmax of G only. Weights: mask · softmax(z) (the
/// default), or mask · G with use_gumbel_gates (hard phase: 1, with G's gradient, straight-through).
/// Evaluation (set_training(false)): top-1 of softmax(z) with weight p, as the official code's top1gating.
/// Noise is a pure function of (seed, step, token, expert): reproducible, independent of the thread count;
/// keep step() unchanged between a route and its backward.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

#include "../config.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/softmax.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
#include "../random.hpp"
#include "../route_io.hpp"
#include "../workspace.hpp"
#include "linear_gate.hpp"
#include "noise.hpp"
#include "scores.hpp"
#include "token_chunks.hpp"

namespace moe::routers {

/// How τ moves from max_temperature to min_temperature.
enum class TemperatureDecay {
  constant,     ///< τ = max_temperature
  exponential,  ///< τ_t = max(τ_max · exp(ln(τ_min/τ_max) · t / decay_steps), τ_min)
  linear        ///< τ_t = max(τ_max - t (τ_max - τ_min) / decay_steps, τ_min)
};

/// Knobs of DenseToSparseGate (defaults: the official code's).
struct DenseToSparseOptions {
  double threshold = 0.001;        ///< γ: an expert is active when G_i > γ; in (0, 1)
  double max_temperature = 1.0;    ///< τ at step 0; finite, >= 1 / max(T)
  double min_temperature = 0.5;    ///< τ floor; finite, >= 1 / max(T), <= max_temperature
  TemperatureDecay decay = TemperatureDecay::exponential;  ///< schedule
  std::uint64_t decay_steps = 1000;  ///< steps to reach min_temperature (`gumbel_decay_factor`), >= 1
  std::int64_t hard_switch_step = -1;  ///< from this step on, top-1 of G (`switch_to_hard_gumbel_softmax`); -1: never
  bool use_gumbel_gates = false;       ///< weights from G instead of softmax(z)
  std::uint64_t seed = 0;              ///< noise seed
};

/// EvoMoE's dense-to-sparse gate.
/// @tparam T    scalar type
/// @tparam Arch instruction set of the kernels
template <class T, class Arch = kernels::default_arch>
class DenseToSparseGate {
 public:
  using Scalar = T;

  /// @param shape d_model, n_experts, top_k = the most slots a token may use (n_experts: fully dense)
  /// @param options the knobs (throws moe::Error naming a bad field)
  DenseToSparseGate(const MoEConfig& shape, const DenseToSparseOptions& options = {})
      : d_model_(shape.validated().d_model),
        n_experts_(shape.n_experts),
        top_k_(shape.top_k),
        options_(validated(shape, options)),
        gate_(d_model_, {{"gate", n_experts_}}) {
    set_step(0);
  }

  Index d_model() const { return d_model_; }        ///< token width
  Index n_experts() const { return n_experts_; }    ///< experts
  Index top_k() const { return top_k_; }            ///< the most slots a token uses
  /// What backward reads: the distribution the weights come from.
  struct Saved {
    T* probabilities = nullptr;  ///< (n_tokens, n_experts) softmax(z), or G with gumbel gates
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const { return {arena.take<T>(n_tokens * n_experts_)}; }
  const DenseToSparseOptions& options() const { return options_; }  ///< the knobs

  /// The gate weight W_g, (n_experts, d_model).
  MatrixView<T> gate() { return gate_.block(0).value(); }
  ConstMatrixView<T> gate() const { return gate_.block(0).value(); }

  /// τ of the schedule at `step`.
  static double temperature_at(const DenseToSparseOptions& o, std::uint64_t step) {
    const double t = static_cast<double>(step) / static_cast<double>(o.decay_steps);
    switch (o.decay) {
      case TemperatureDecay::exponential:
        // ln τ_min - ln τ_max, not ln(τ_min / τ_max): the ratio of two valid temperatures may underflow to 0.
        return std::max(o.max_temperature * std::exp((std::log(o.min_temperature) - std::log(o.max_temperature)) * t),
                        o.min_temperature);
      case TemperatureDecay::linear:
        return std::max(o.max_temperature - t * (o.max_temperature - o.min_temperature), o.min_temperature);
      case TemperatureDecay::constant:
        break;
    }
    return o.max_temperature;
  }

  /// Sets the training step: τ from the schedule, the phase (soft or hard) and the noise.
  void set_step(std::uint64_t step) {
    step_ = step;
    temperature_ = temperature_at(options_, step);
    hard_ = options_.hard_switch_step >= 0 && step >= static_cast<std::uint64_t>(options_.hard_switch_step);
  }
  std::uint64_t step() const { return step_; }        ///< the current step
  double temperature() const { return temperature_; }  ///< τ at the current step
  bool hard() const { return hard_; }                  ///< whether the hard (top-1) phase is on
  /// Training (Gumbel noise, the DTS rule; the default) or evaluation (top-1 of softmax(z)).
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }  ///< whether training is on

  /// Fills W_g from U(-1/sqrt(d_model), 1/sqrt(d_model)).
  void init(Rng& rng) { gate_.init(rng); }
  /// f(name, Parameter&) for W_g ("gate").
  template <class F>
  void visit_parameters(F&& f) {
    gate_.visit(f);
  }  /// No state besides the parameters.
  template <class F>
  void visit_state(F&&) {}

  /// Routes in.x (n_tokens, d_model): ids (n_tokens, top_k), active experts by descending G then -1; weights
  /// (n_tokens, top_k).
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    const Index n_tokens = x.rows(), n_chunks = detail::n_token_chunks(n_tokens);
    T* gumbel = arena.take<T>(n_chunks * n_experts_);  // (n_chunks, n_experts) G of one token
    if (arena.measuring() || n_tokens == 0) return;
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index c, Index t0, Index t1) {
      gate_.logits(x.middle_rows(t0, t1 - t0),
                   MatrixView<T>(out.saved.probabilities + t0 * n_experts_, t1 - t0, n_experts_));
      choose(c, t0, t1, gumbel, out);
    });
  }

  /// As route(), from logits W_g x (n_tokens, n_experts) computed elsewhere (routers::WithLosses computes them once).
  void route_logits(ConstMatrixView<T> logits, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = logits.rows(), n_chunks = detail::n_token_chunks(n_tokens);
    T* gumbel = arena.take<T>(n_chunks * n_experts_);  // (n_chunks, n_experts) G of one token
    if (arena.measuring() || n_tokens == 0) return;
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index c, Index t0, Index t1) {
      for (Index t = t0; t < t1; ++t) std::copy_n(logits.row(t), n_experts_, out.saved.probabilities + t * n_experts_);
      choose(c, t0, t1, gumbel, out);
    });
  }

  /// Backward of route(): dL/dw on the used slots through softmax(z) (or G, with its 1/τ), adds dL/dx to
  /// grad.dx and accumulates dL/dW_g. The mask is piecewise constant: no gradient.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens();
    T* dlogits = arena.take<T>(n_tokens * n_experts_);  // (n_tokens, n_experts)
    if (arena.measuring() || n_tokens == 0) return;
    const bool through_g = training_ && options_.use_gumbel_gates;
    const T inv_tau = static_cast<T>(1.0 / temperature_);
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      T* dz = dlogits + t * n_experts_;
      detail::scatter_slots(out.ids + t * top_k_, grad.dweights + t * top_k_, top_k_, dz, n_experts_);
      detail::score_backward(ScoreFunction::softmax, out.saved.probabilities + t * n_experts_, dz, n_experts_);
      if (through_g)
        for (Index e = 0; e < n_experts_; ++e) dz[e] *= inv_tau;
    }
    gate_.backward(in.x, ConstMatrixView<T>(dlogits, n_tokens, n_experts_), grad.dx);
  }

  /// @name Balance protocol (moe::BalanceRouter): columns = experts, p = softmax(z) without noise (EvoMoE's
  /// `me`), chosen columns = the active experts. With losses::SwitchLoss, f is the share of the *active* slots
  /// (Σf = 1); EvoMoE's E²·mean(me·ce) uses ce = the mean mask (Σ = active experts per token): it equals the
  /// Switch value times the mean active count.
  /// @{
  Index balance_width() const { return n_experts_; }  ///< columns: the experts
  /// z (n_tokens, n_experts) = W_g x, the logits before noise and τ.
  void balance_logits(const RouteInput<T>& in, MatrixView<T> z, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    if (arena.measuring() || x.rows() == 0) return;
    detail::for_each_token_chunk(x.rows(), double(n_experts_) * double(d_model_), [&](Index, Index t0, Index t1) {
      gate_.logits(x.middle_rows(t0, t1 - t0), z.middle_rows(t0, t1 - t0));
    });
  }
  /// One token: s = p = softmax(z).
  void balance_probabilities(const T* z, T* s, T* p) const {
    kernels::softmax_row(Arch{}, z, s, n_experts_);
    std::copy_n(s, n_experts_, p);
  }
  /// One token: g = dL/dp on entry (clobbered); ADDS dL/dz to dz.
  void balance_probabilities_backward(const T* s, const T* /*p*/, T* g, T* dz) const {
    detail::score_backward(ScoreFunction::softmax, s, g, n_experts_);
    for (Index e = 0; e < n_experts_; ++e) dz[e] += g[e];
  }
  /// The column of each slot: its expert (inactive slots hold -1).
  void balance_choice(const RouteOutput<T, Saved>& out, Index n_tokens, Index* cols) const {
    std::copy_n(out.ids, n_tokens * top_k_, cols);
  }
  /// From dz (n_tokens, n_experts): accumulates dL/dW_g and ADDS dL/dx to grad.dx.
  void balance_logits_backward(const RouteInput<T>& in, ConstMatrixView<T> dz, const RouteGradient<T>& grad, Arena&) {
    if (in.n_tokens() > 0 && dz.data() != nullptr) gate_.backward(in.x, dz, grad.dx);
  }
  /// @}

 private:
  // Tokens [t0, t1) of chunk c, whose logits are in out.saved (see the class comment for the rule).
  void choose(Index c, Index t0, Index t1, T* gumbel, const RouteOutput<T, Saved>& out) const {
    const T inv_tau = static_cast<T>(1.0 / temperature_);
    T* g = gumbel + c * n_experts_;
    for (Index t = t0; t < t1; ++t) {
      T* z = out.saved.probabilities + t * n_experts_;
      Index* id = out.ids + t * top_k_;
      T* w = out.weights + t * top_k_;
      std::fill_n(id, top_k_, Index{-1});
      std::fill_n(w, top_k_, T(0));
      if (!training_) {  // evaluation: top-1 of softmax(z), weight p
        kernels::softmax_row(Arch{}, z, z, n_experts_);
        kernels::top_k(Arch{}, z, n_experts_, 1, id);
        w[0] = z[id[0]];
        continue;
      }
      for (Index e = 0; e < n_experts_; ++e)
        g[e] = (z[e] + static_cast<T>(detail::counter_gumbel(options_.seed, step_, t, e))) * inv_tau;
      kernels::softmax_row(Arch{}, g, g, n_experts_);
      const Index used = hard_ ? 1 : top_k_;
      kernels::top_k(Arch{}, g, n_experts_, used, id);
      if (options_.use_gumbel_gates) {
        std::copy_n(g, n_experts_, z);
      } else {
        kernels::softmax_row(Arch{}, z, z, n_experts_);
      }
      for (Index s = 0; s < used; ++s) {
        // Soft phase: active iff G > γ (the ids are by descending G, so the first inactive ends the list).
        // Hard phase: the argmax, whatever its G.
        if (!hard_ && !(g[id[s]] > static_cast<T>(options_.threshold))) {
          std::fill(id + s, id + top_k_, Index{-1});
          break;
        }
        w[s] = hard_ && options_.use_gumbel_gates ? T(1) : z[id[s]];
      }
    }
  }

  static const DenseToSparseOptions& validated(const MoEConfig& shape, const DenseToSparseOptions& o) {
    constexpr const char* who = "moe::routers::DenseToSparseGate";
    moe::detail::require_in(o.threshold, {.lo = 0.0, .hi = 1.0, .open_lo = true, .open_hi = true}, who,
                            "options.threshold");
    // Every τ of the schedule lies in [min_temperature, max_temperature]; 1 / τ multiplies logits in T.
    const moe::detail::Interval temperature{.lo = 1.0 / static_cast<double>(std::numeric_limits<T>::max())};
    moe::detail::require_in(o.max_temperature, temperature, who, "options.max_temperature");
    moe::detail::require_in(o.min_temperature, temperature, who, "options.min_temperature");
    moe::detail::require(o.min_temperature <= o.max_temperature, who, ": options.min_temperature = ", o.min_temperature,
                         " exceeds options.max_temperature = ", o.max_temperature);
    moe::detail::require(o.decay_steps >= 1, who, ": options.decay_steps must be >= 1");
    moe::detail::require(o.hard_switch_step >= -1, who, ": options.hard_switch_step = ", o.hard_switch_step,
                         " must be >= 0, or -1 for never");
    moe::detail::checked_size<T>(who, "n_experts * d_model", {shape.n_experts, shape.d_model});
    return o;
  }

  Index d_model_;
  Index n_experts_;
  Index top_k_;
  DenseToSparseOptions options_;
  detail::LinearGate<T, Arch> gate_;  // W_g (n_experts, d_model)
  bool training_ = true;
  std::uint64_t step_ = 0;
  double temperature_ = 1.0;
  bool hard_ = false;
};

}  // namespace moe::routers
