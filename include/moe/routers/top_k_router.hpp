#pragma once
/// @file routers/top_k_router.hpp
/// @brief TopKRouter: token-choice top-k gating with independent knobs (PAPERS.md A.1), and the presets
/// of Switch, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V2(-Lite) and DeepSeek-V3 built from them.
///
/// Per token: z = (W_g x̃ + b_g) / τ (b_g only with options.gate_bias; x̃ = x, or x with multiplicative jitter in
/// training); scores s = f(z) (softmax, sigmoid or sqrt-softplus; raw z when the softmax comes after top-k); selection
/// keys = s (+ the selection-only bias b) (+ Gumbel noise on z in training); optionally group-limited (keep the top
/// `top_k_groups` of `n_groups` groups, each scored by the sum of its top `group_score_top` keys); top-k of
/// the keys (ties: lower id); weights = s of the chosen experts, optionally divided by their sum, or the
/// softmax over the chosen logits; times the routed scaling factor.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../kernels/arch.hpp"
#include "../kernels/simd/softmax.hpp"
#include "../kernels/simd/top_k.hpp"
#include "../moe_config.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../route_io.hpp"
#include "../workspace.hpp"
#include "linear_gate.hpp"
#include "noise.hpp"
#include "scores.hpp"
#include "token_chunks.hpp"

namespace moe::routers {

/// The knobs of TopKRouter. Defaults are Mixtral's (softmax, top-k, renormalise). Use designated
/// initialisers: `TopKOptions{.score = ScoreFunction::sigmoid, .selection_bias = true}`.
struct TopKOptions {
  ScoreFunction score = ScoreFunction::softmax;  ///< logits -> scores
  bool softmax_after_top_k = false;  ///< choose on the logits, weights = softmax over the k chosen logits
                                     ///< (Shazeer 2017, gpt-oss); needs score = softmax; weights sum to 1
  bool renormalize = true;           ///< divide the k chosen scores by their sum (norm_topk_prob)
  bool selection_bias = false;       ///< add a bias b to the keys that choose, not to the weights (DeepSeek-V3)
  Index n_groups = 1;                ///< group-limited top-k: experts in n_groups equal groups (1: off)
  Index top_k_groups = 1;            ///< groups kept per token
  Index group_score_top = 1;         ///< a group's score: sum of its top group_score_top keys (V2: 1 = max, V3: 2)
  double routed_scaling_factor = 1.0;  ///< multiplies every weight (DeepSeek-V2: 16, V3: 2.5); in (0, max(T)]
  double temperature = 1.0;            ///< z = W_g x / temperature; finite, >= 1 / max(T)
  double jitter = 0.0;        ///< training: x̃ = x · U(1 - jitter, 1 + jitter) elementwise (Switch: 0.01); in [0, 1)
  bool gumbel_noise = false;  ///< training: choose with Gumbel noise on the logits (weights stay clean)
  bool gate_bias = false;     ///< z = W_g x + b_g: the gate is an nn.Linear with bias (gpt-oss); b_g is a parameter
  std::uint64_t seed = 0;     ///< noise seed; noise is a hash of (seed, step, token, index)
};

/// Token-choice top-k router with the knobs of TopKOptions.
///
/// Numeric policy: NaN logits count as -inf; a row without a finite logit gets the lowest ids with weight 0;
/// chosen scores whose sum underflows in T are renormalised in log space (detail::renormalize);
/// +inf logits share the weight of a normalised row equally. Ids are always distinct and in [0, n_experts).
/// Noise (jitter, Gumbel) is on only after set_training(true) and is a pure function of (seed, step(),
/// token, index): reproducible and independent of the thread count. Keep step() unchanged between a route
/// and its backward (backward recomputes the jitter).
/// @tparam T    scalar type (float; double for references and gradient checks)
/// @tparam Arch instruction set of the kernels (see kernels/arch.hpp)
template <class T, class Arch = kernels::default_arch>
class TopKRouter {
 public:
  using Scalar = T;

  /// @param shape d_model, n_experts, top_k (validated, like every option: throws moe::Error naming the field)
  /// @param options the knobs (defaults: Mixtral)
  explicit TopKRouter(const MoEConfig& shape, const TopKOptions& options = {})
      : d_model_(shape.validated().d_model),
        n_experts_(shape.n_experts),
        top_k_(shape.top_k),
        options_(validated(shape, options)),
        gate_(d_model_, {{"gate", n_experts_}}, options.gate_bias),
        bias_(options.selection_bias ? static_cast<std::size_t>(n_experts_) : 0, T(0)) {}

  /// Throws the moe::Error the constructor would throw for (shape, options), without allocating the gate.
  static void validate(const MoEConfig& shape, const TopKOptions& options) {
    (void)validated(shape.validated(), options);
  }

  Index d_model() const { return d_model_; }         ///< token width
  Index n_experts() const { return n_experts_; }     ///< experts routed over
  Index top_k() const { return top_k_; }             ///< slots per token
  /// What backward reads: the scores s, and, when renormalising, the chosen logits (after the temperature) for
  /// the weights whose scores underflow (detail::renormalize).
  struct Saved {
    T* scores = nullptr;         ///< (n_tokens, n_experts) s
    T* chosen_logits = nullptr;  ///< (n_tokens, top_k) when renormalising, else nullptr
  };
  Saved carve_saved(Arena& arena, Index n_tokens) const {
    Saved s;
    s.scores = arena.take<T>(n_tokens * n_experts_);
    if (logit_columns() > 0) s.chosen_logits = arena.take<T>(n_tokens * top_k_);
    return s;
  }
  const TopKOptions& options() const { return options_; }  ///< the knobs
  bool renormalize() const { return options_.renormalize; }  ///< whether the k weights are renormalised

  /// The gate weight W_g, (n_experts, d_model) row-major (Hugging Face `gate.weight` layout).
  MatrixView<T> gate() { return gate_.block(0).value(); }
  ConstMatrixView<T> gate() const { return gate_.block(0).value(); }

  /// The gate's bias b_g, (1, n_experts) (options.gate_bias; HF gpt-oss `router.bias`); (0, n_experts) without.
  MatrixView<T> gate_bias() { return gate_.bias().value(); }
  ConstMatrixView<T> gate_bias() const { return gate_.bias().value(); }

  /// The selection-only bias b (n_experts; empty unless options.selection_bias): HF `e_score_correction_bias`.
  std::span<T> bias() { return bias_; }
  std::span<const T> bias() const { return bias_; }

  /// Turns the training noise (jitter, Gumbel) on or off; off by default.
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }  ///< whether noise is on
  /// Sets the step that, with the seed, token and index, determines the noise.
  void set_step(std::uint64_t step) { step_ = step; }
  std::uint64_t step() const { return step_; }  ///< the noise step

  /// Fills W_g from U(-1/sqrt(d_model), 1/sqrt(d_model)), the nn.Linear default.
  void init(Rng& rng) { gate_.init(rng); }

  /// Calls f(name, Parameter&) for W_g ("gate") and, with options.gate_bias, b_g ("gate_bias"). The selection
  /// bias is not a parameter: it learns by update_bias.
  template <class F>
  void visit_parameters(F&& f) {
    gate_.visit(f);
  }
  /// Calls f(name, std::span<T>) for the selection bias ("bias", with options.selection_bias): state that
  /// learns by update_bias, not by gradient.
  template <class F>
  void visit_state(F&& f) {
    if (options_.selection_bias) f(std::string_view("bias"), std::span<T>(bias_));
  }

  /// The aux-loss-free balancing step (DeepSeek-V3, Megatron `get_updated_expert_bias`):
  /// b_i += rate · sign(mean_j c_j - c_i), so an overloaded expert becomes less likely to be chosen.
  /// @param counts (n_experts,) tokens routed to each expert over the batch (e.g. ForwardResult::tokens_per_expert)
  /// @param rate the update speed γ (Megatron default 1e-3)
  void update_bias(std::span<const Index> counts, double rate) {
    moe::detail::require(options_.selection_bias, "moe::routers::TopKRouter::update_bias: options.selection_bias is false");
    moe::detail::require(static_cast<Index>(counts.size()) == n_experts_, "moe::routers::TopKRouter::update_bias: counts has ",
                         counts.size(), " entries, expected n_experts = ", n_experts_);
    moe::detail::require_in(rate, {.lo = 0.0, .hi = static_cast<double>(std::numeric_limits<T>::max())},
                            "moe::routers::TopKRouter::update_bias", "rate");
    double mean = 0;
    for (Index c : counts) mean += static_cast<double>(c);
    mean /= static_cast<double>(n_experts_);
    for (Index e = 0; e < n_experts_; ++e) {
      const double gap = mean - static_cast<double>(counts[static_cast<std::size_t>(e)]);
      bias_[static_cast<std::size_t>(e)] += static_cast<T>(rate * static_cast<double>((gap > 0) - (gap < 0)));
    }
  }

  /// Routes in.x (n_tokens, d_model) to out.ids (n_tokens, top_k), ordered by descending key (ties: lower id
  /// first), and out.weights (n_tokens, top_k); out.saved receives the scores and the chosen logits.
  void route(const RouteInput<T>& in, RouteOutput<T, Saved>& out, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    const Index n_tokens = x.rows();
    T* jittered = jitter_on() ? arena.take<T>(n_tokens * d_model_) : nullptr;  // (n_tokens, d_model)
    const Scratch scratch = take_scratch(n_tokens, arena);
    if (arena.measuring() || n_tokens == 0) return;

    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index c, Index t0, Index t1) {
      ConstMatrixView<T> xc = x.middle_rows(t0, t1 - t0);
      if (jittered != nullptr) xc = jitter(xc, t0, jittered + t0 * d_model_);
      gate_.logits(xc, MatrixView<T>(out.saved.scores + t0 * n_experts_, t1 - t0, n_experts_));
      route_chunk(c, t0, t1, scratch, out);
    });
  }

  /// As route(), from logits (n_tokens, n_experts) computed elsewhere (e.g. with a gating residual added):
  /// everything after the gate. No jitter (it acts on x).
  void route_logits(ConstMatrixView<T> logits, RouteOutput<T, Saved>& out, Arena& arena) const {
    const Index n_tokens = logits.rows();
    const Scratch scratch = take_scratch(n_tokens, arena);
    if (arena.measuring() || n_tokens == 0) return;
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index c, Index t0, Index t1) {
      for (Index t = t0; t < t1; ++t) std::copy_n(logits.row(t), n_experts_, out.saved.scores + t * n_experts_);
      route_chunk(c, t0, t1, scratch, out);
    });
  }

  /// Backward of route(): from grad.dweights (n_tokens, top_k) adds dL/dx to grad.dx (n_tokens, d_model) and
  /// accumulates dL/dW_g. See logits_backward() for the chain up to the logits.
  void route_backward(const RouteInput<T>& in, const RouteOutput<T, Saved>& out, const RouteGradient<T>& grad,
                      Arena& arena) {
    const Index n_tokens = in.n_tokens();
    T* dlogits = arena.take<T>(n_tokens * n_experts_);  // (n_tokens, n_experts)
    const MatrixView<T> dz = arena.measuring() ? MatrixView<T>::shape_only(n_tokens, n_experts_)
                                               : MatrixView<T>(dlogits, n_tokens, n_experts_);
    logits_backward(out, grad.dweights, dz, arena);
    balance_logits_backward(in, dz, grad, arena);
  }

  /// @name Balance protocol (moe::BalanceRouter): what loss policies (routers::WithLosses) read.
  /// The columns are the experts; p = softmax(z / τ) for the softmax score, s / Σs for sigmoid and
  /// sqrt-softplus (DeepSeek-V3's normalised scores).
  /// @{
  Index balance_width() const { return n_experts_; }  ///< columns: the experts

  /// z (n_tokens, n_experts) = the logits route() chooses on (W_g x̃, before the temperature).
  void balance_logits(const RouteInput<T>& in, MatrixView<T> z, Arena& arena) const {
    const ConstMatrixView<T> x = in.x;
    const Index n_tokens = x.rows();
    T* jittered = jitter_on() ? arena.take<T>(n_tokens * d_model_) : nullptr;  // (n_tokens, d_model)
    if (arena.measuring() || n_tokens == 0) return;
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index, Index t0, Index t1) {
      ConstMatrixView<T> xc = x.middle_rows(t0, t1 - t0);
      if (jittered != nullptr) xc = jitter(xc, t0, jittered + t0 * d_model_);
      gate_.logits(xc, z.middle_rows(t0, t1 - t0));
    });
  }
  /// One token: scores s and probabilities p from its logits z.
  void balance_probabilities(const T* z, T* s, T* p) const {
    std::copy_n(z, n_experts_, s);
    if (options_.temperature != 1.0)
      for (Index e = 0; e < n_experts_; ++e) s[e] *= static_cast<T>(1.0 / options_.temperature);
    detail::score_row(Arch{}, options_.score, s, s, n_experts_);
    std::copy_n(s, n_experts_, p);
    if (options_.score != ScoreFunction::softmax) detail::normalize(p, n_experts_);
  }
  /// One token: g = dL/dp on entry (clobbered); ADDS dL/dz to dz.
  void balance_probabilities_backward(const T* s, const T* /*p*/, T* g, T* dz) const {
    if (options_.score != ScoreFunction::softmax) detail::normalize_backward(s, g, n_experts_);
    detail::score_backward(options_.score, s, g, n_experts_);
    const T inv_temperature = static_cast<T>(1.0 / options_.temperature);
    for (Index e = 0; e < n_experts_; ++e) dz[e] += g[e] * inv_temperature;
  }
  /// The column of each slot: its expert.
  void balance_choice(const RouteOutput<T, Saved>& out, Index n_tokens, Index* cols) const {
    std::copy_n(out.ids, n_tokens * top_k_, cols);
  }
  /// From dz (n_tokens, n_experts) = dL/dz: accumulates dL/dW_g and ADDS dL/dx to grad.dx (through the jitter).
  void balance_logits_backward(const RouteInput<T>& in, ConstMatrixView<T> dz, const RouteGradient<T>& grad,
                               Arena& arena) {
    const ConstMatrixView<T> x = in.x;
    const MatrixView<T> dx = grad.dx;
    const Index n_tokens = x.rows();
    T* jittered = jitter_on() ? arena.take<T>(n_tokens * d_model_) : nullptr;   // (n_tokens, d_model)
    T* djittered = jitter_on() ? arena.take<T>(n_tokens * d_model_) : nullptr;  // (n_tokens, d_model)
    if (arena.measuring() || n_tokens == 0) return;
    if (jittered == nullptr) {
      gate_.backward(x, dz, dx);
      return;
    }
    // x̃ = x ⊙ m: dW uses x̃, and dx += (dz W) ⊙ m.
    detail::for_each_token_chunk(n_tokens, double(n_experts_) * double(d_model_), [&](Index, Index t0, Index t1) {
      jitter(x.middle_rows(t0, t1 - t0), t0, jittered + t0 * d_model_);
      std::fill_n(djittered + t0 * d_model_, (t1 - t0) * d_model_, T(0));
    });
    gate_.backward(ConstMatrixView<T>(jittered, n_tokens, d_model_), dz, MatrixView<T>(djittered, n_tokens, d_model_));
    const T eps = static_cast<T>(options_.jitter);
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t)
      for (Index j = 0; j < d_model_; ++j) dx(t, j) += djittered[t * d_model_ + j] * jitter_factor(t, j, eps);
  }
  /// @}

  /// Backward from the weights to the logits: WRITES dlogits (n_tokens, n_experts). Slots with id < 0 get no
  /// gradient. Chain: scaling, then the renormalisation (dL/ds_i = (g_i - <g, u>) / Σs) or the softmax over
  /// the chosen logits, then the score function (a renormalisation in log space goes to the logits at
  /// once), then 1/τ. The choice (bias, groups, Gumbel noise) is
  /// piecewise constant: no gradient. With top_k = 1 and renormalisation the weight is constantly 1, so the
  /// router gets no gradient.
  void logits_backward(const RouteOutput<T, Saved>& out, const T* dweights, MatrixView<T> dlogits, Arena& arena) const {
    const Index n_tokens = dlogits.rows();
    T* chosen = arena.take<T>(n_tokens * top_k_);   // (n_tokens, top_k) chosen scores
    T* dchosen = arena.take<T>(n_tokens * top_k_);  // (n_tokens, top_k) gradient w.r.t. them
    if (arena.measuring() || n_tokens == 0) return;

    const T scale = static_cast<T>(options_.routed_scaling_factor);
    const T inv_temperature = static_cast<T>(1.0 / options_.temperature);
    MOE_OMP(omp parallel for schedule(static) if(double(n_tokens) * double(n_experts_) * double(d_model_) >= moe::detail::k_parallel_min_work))
    for (Index t = 0; t < n_tokens; ++t) {
      const T* s = out.saved.scores + t * n_experts_;
      const Index* id = out.ids + t * top_k_;
      T* u = chosen + t * top_k_;
      T* g = dchosen + t * top_k_;
      T* dz = dlogits.row(t);
      detail::gather_slots(s, id, dweights + t * top_k_, top_k_, scale, u, g);
      if (options_.softmax_after_top_k) {
        kernels::softmax_row(Arch{}, u, u, top_k_);  // the chosen logits -> the weights
        detail::score_backward(ScoreFunction::softmax, u, g, top_k_);
        detail::scatter_slots(id, g, top_k_, dz, n_experts_);
      } else if (options_.renormalize && detail::renormalizes_in_log_space(u, top_k_)) {
        detail::renormalize_log_backward(options_.score, out.saved.chosen_logits + t * top_k_, u, g, top_k_);
        detail::scatter_slots(id, g, top_k_, dz, n_experts_);
      } else {
        if (options_.renormalize) detail::normalize_backward(u, g, top_k_);
        detail::scatter_slots(id, g, top_k_, dz, n_experts_);
        detail::score_backward(options_.score, s, dz, n_experts_);
      }
      if (options_.temperature != 1.0)
        for (Index e = 0; e < n_experts_; ++e) dz[e] *= inv_temperature;
    }
  }

 private:
  static TopKOptions validated(const MoEConfig& shape, const TopKOptions& o) {
    constexpr const char* who = "moe::routers::TopKRouter";
    const Index E = shape.n_experts;
    moe::detail::require(!o.softmax_after_top_k || o.score == ScoreFunction::softmax, who,
                         ": options.softmax_after_top_k needs options.score = softmax");
    moe::detail::require(o.n_groups >= 1 && E % o.n_groups == 0, who, ": options.n_groups = ", o.n_groups,
                         " must be >= 1 and divide n_experts = ", E);
    moe::detail::require(o.top_k_groups >= 1 && o.top_k_groups <= o.n_groups, who, ": options.top_k_groups = ",
                         o.top_k_groups, " must be in [1, n_groups = ", o.n_groups, "]");
    const Index group_size = E / o.n_groups;
    moe::detail::require(o.group_score_top >= 1 && o.group_score_top <= group_size, who,
                         ": options.group_score_top = ", o.group_score_top, " must be in [1, group size = ", group_size, "]");
    moe::detail::require(shape.top_k <= o.top_k_groups * group_size, who, ": top_k = ", shape.top_k,
                         " exceeds the experts of options.top_k_groups = ", o.top_k_groups, " groups (",
                         o.top_k_groups * group_size, ")");
    // The weights are scaled in T, the logits multiplied by 1 / temperature in T: both must be finite T values.
    const double t_max = static_cast<double>(std::numeric_limits<T>::max());
    moe::detail::require_in(o.routed_scaling_factor, {.lo = 0.0, .hi = t_max, .open_lo = true}, who,
                            "options.routed_scaling_factor");
    moe::detail::require_in(o.temperature, {.lo = 1.0 / t_max}, who, "options.temperature");
    moe::detail::require_in(o.jitter, {.lo = 0.0, .hi = 1.0, .open_hi = true}, who, "options.jitter");
    moe::detail::checked_size<T>(who, "n_experts * d_model", {E, shape.d_model});
    return o;
  }

  // Per-chunk scratch of the choice: taken only by the knobs that need it (plain top-k takes nothing).
  struct Scratch {
    T* keys = nullptr;             // (n_chunks, n_experts) selection keys
    T* logits = nullptr;           // (n_chunks, n_experts) the logits after the temperature, when renormalising
    T* group_scores = nullptr;     // (n_chunks, n_groups)
    Index* group_ids = nullptr;    // (n_chunks, n_group_ids)
    Index n_group_ids = 0;
  };

  Scratch take_scratch(Index n_tokens, Arena& arena) const {
    const Index n_chunks = detail::n_token_chunks(n_tokens);
    Scratch s;
    if (separate_keys()) s.keys = arena.take<T>(n_chunks * n_experts_);
    if (logit_columns() > 0) s.logits = arena.take<T>(n_chunks * n_experts_);
    if (options_.n_groups > 1) {
      s.n_group_ids = std::max(options_.top_k_groups, options_.group_score_top);
      s.group_scores = arena.take<T>(n_chunks * options_.n_groups);
      s.group_ids = arena.take<Index>(n_chunks * s.n_group_ids);
    }
    return s;
  }

  // Tokens [t0, t1) of chunk c, whose logits are in out.saved.scores.
  void route_chunk(Index c, Index t0, Index t1, const Scratch& sc, const RouteOutput<T, Saved>& out) const {
    const auto row = [c](T* p, Index width) { return p == nullptr ? nullptr : p + c * width; };
    T* chosen_logits = out.saved.chosen_logits;  // (n_tokens, top_k) or nullptr
    for (Index t = t0; t < t1; ++t)
      route_token(t, out.saved.scores + t * n_experts_, row(sc.keys, n_experts_), row(sc.logits, n_experts_),
                  row(sc.group_scores, options_.n_groups),
                  sc.group_ids == nullptr ? nullptr : sc.group_ids + c * sc.n_group_ids, out.ids + t * top_k_,
                  out.weights + t * top_k_, chosen_logits == nullptr ? nullptr : chosen_logits + t * top_k_);
  }

  // Chosen logits kept for a renormalisation in log space (detail::renormalize).
  Index logit_columns() const { return options_.renormalize && !options_.softmax_after_top_k ? top_k_ : 0; }

  bool jitter_on() const { return training_ && options_.jitter > 0.0; }
  bool gumbel_on() const { return training_ && options_.gumbel_noise; }
  // The keys differ from the scores, so they need their own row.
  bool separate_keys() const { return gumbel_on() || options_.selection_bias || options_.n_groups > 1; }

  T jitter_factor(Index t, Index j, T eps) const {
    // Index -(j + 1): the jitter stream never meets the Gumbel stream (index = expert >= 0).
    return T(1) + eps * static_cast<T>(2.0 * detail::counter_uniform(options_.seed, step_, t, -(j + 1)) - 1.0);
  }

  // out (rows, d_model) = x ⊙ jitter factors of tokens t0, t0 + 1, ...
  ConstMatrixView<T> jitter(ConstMatrixView<T> x, Index t0, T* out) const {
    const T eps = static_cast<T>(options_.jitter);
    for (Index r = 0; r < x.rows(); ++r)
      for (Index j = 0; j < d_model_; ++j) out[r * d_model_ + j] = x(r, j) * jitter_factor(t0 + r, j, eps);
    return ConstMatrixView<T>(out, x.rows(), d_model_);
  }

  // Logits -> what the weights are taken from, in place: the scores, or (softmax after top-k) the logits
  // with NaN read as -inf. `logits` (n_experts; may be null) receives the logits after the temperature.
  void scores(T* z, T* logits) const {
    if (options_.temperature != 1.0) {
      const T inv = static_cast<T>(1.0 / options_.temperature);
      for (Index e = 0; e < n_experts_; ++e) z[e] *= inv;
    }
    if (logits != nullptr) std::copy_n(z, n_experts_, logits);
    if (options_.softmax_after_top_k) {
      for (Index e = 0; e < n_experts_; ++e) z[e] = std::isnan(z[e]) ? -std::numeric_limits<T>::infinity() : z[e];
    } else {
      detail::score_row(Arch{}, options_.score, z, z, n_experts_);
    }
  }

  // Excludes (key = NaN, below every real key) the experts outside the top_k_groups best groups.
  void limit_groups(T* key, T* group_score, Index* group_id) const {
    const Index n_groups = options_.n_groups, size = n_experts_ / n_groups;
    for (Index g = 0; g < n_groups; ++g) {
      kernels::top_k(Arch{}, key + g * size, size, options_.group_score_top, group_id);
      T sum = 0;
      for (Index i = 0; i < options_.group_score_top; ++i) sum += key[g * size + group_id[i]];
      group_score[g] = sum;
    }
    kernels::top_k(Arch{}, group_score, n_groups, options_.top_k_groups, group_id);
    for (Index g = 0; g < n_groups; ++g) {
      if (std::find(group_id, group_id + options_.top_k_groups, g) != group_id + options_.top_k_groups) continue;
      std::fill_n(key + g * size, size, std::numeric_limits<T>::quiet_NaN());
    }
  }

  // `logits` (n_experts) scratch and `chosen_logits` (top_k) output: both null unless renormalising.
  void route_token(Index t, T* s, T* key, T* logits, T* group_score, Index* group_id, Index* id, T* w,
                   T* chosen_logits) const {
    // s holds the logits on entry and the scores on return.
    if (gumbel_on()) {
      const T inv = static_cast<T>(1.0 / options_.temperature);
      for (Index e = 0; e < n_experts_; ++e)
        key[e] = s[e] * inv + static_cast<T>(detail::counter_gumbel(options_.seed, step_, t, e));
      if (!options_.softmax_after_top_k) detail::score_row(Arch{}, options_.score, key, key, n_experts_);
    }
    scores(s, logits);
    if (key != nullptr) {
      if (!gumbel_on()) std::copy_n(s, n_experts_, key);
      for (std::size_t e = 0; e < bias_.size(); ++e) key[e] += bias_[e];
      // A NaN key can only come from +inf + -inf: read it as -inf, so only excluded experts are NaN.
      for (Index e = 0; e < n_experts_; ++e) key[e] = std::isnan(key[e]) ? -std::numeric_limits<T>::infinity() : key[e];
      if (options_.n_groups > 1) limit_groups(key, group_score, group_id);
    }
    kernels::top_k(Arch{}, key != nullptr ? key : s, n_experts_, top_k_, id);
    for (Index k = 0; k < top_k_; ++k) w[k] = s[id[k]];
    if (options_.softmax_after_top_k) {
      kernels::softmax_row(Arch{}, w, w, top_k_);
    } else if (options_.renormalize) {
      for (Index k = 0; k < top_k_; ++k) chosen_logits[k] = logits[id[k]];
      detail::renormalize(options_.score, chosen_logits, w, top_k_);
    }
    if (options_.routed_scaling_factor != 1.0)
      for (Index k = 0; k < top_k_; ++k) w[k] *= static_cast<T>(options_.routed_scaling_factor);
  }

  Index d_model_;
  Index n_experts_;
  Index top_k_;
  TopKOptions options_;
  detail::LinearGate<T, Arch> gate_;  // W_g (n_experts, d_model)
  std::vector<T> bias_;               // (n_experts,) or empty
  bool training_ = false;
  std::uint64_t step_ = 0;
};

/// Published routers as TopKOptions; give the shape in MoEConfig (published shapes in each comment).
namespace presets {

/// Switch Transformer (arXiv 2101.03961): top-1 of softmax, weight p (not renormalised), router jitter
/// 0.01 in training. Use with top_k = 1.
inline TopKOptions switch_transformer() { return {.renormalize = false, .jitter = 0.01}; }

/// Mixtral (arXiv 2401.04088): softmax, top-2 of 8, renormalised (= softmax over the two chosen logits).
inline TopKOptions mixtral() { return {}; }

/// Qwen1.5/Qwen2-MoE: softmax, top-4 of 60, not renormalised (norm_topk_prob = false).
inline TopKOptions qwen2_moe() { return {.renormalize = false}; }

/// Qwen3-MoE (HF Qwen3-30B-A3B config): softmax, top-8 of 128, renormalised (norm_topk_prob = true).
inline TopKOptions qwen3_moe() {
  return {};
}

/// OLMoE (arXiv 2409.02060; HF OLMoE-1B-7B config): softmax, top-8 of 64, not renormalised.
inline TopKOptions olmoe() {
  return {.renormalize = false};
}

/// gpt-oss (OpenAI 2025; HF GptOssTopKRouter): logits z = W_g x + b_g (an nn.Linear with bias), top-4 of the
/// logits, weights = softmax over the chosen logits.
inline TopKOptions gpt_oss() {
  return {.softmax_after_top_k = true, .gate_bias = true};
}

/// DeepSeek-V2-Lite (HF config): softmax over 64 experts, plain top-6 (topk_method greedy, no groups), not
/// renormalised, routed_scaling_factor 1.
inline TopKOptions deepseek_v2_lite() {
  return {.renormalize = false};
}

/// DeepSeek-V2 (arXiv 2405.04434; HF config): softmax over 160 experts, group_limited_greedy (8 groups scored
/// by their max, keep 3), top-6, not renormalised, weights × 16.
inline TopKOptions deepseek_v2() {
  return {.renormalize = false, .n_groups = 8, .top_k_groups = 3, .group_score_top = 1, .routed_scaling_factor = 16.0};
}

/// DeepSeek-V3 (arXiv 2412.19437; HF config): sigmoid over 256 experts, selection bias, 8 groups scored by
/// the sum of their top-2 keys, keep 4, top-8, renormalised, weights × 2.5. Excluded groups are out of the
/// choice (-inf, as DeepSeek's own inference code; HF fills 0.0, which differs only for negative keys).
inline TopKOptions deepseek_v3() {
  return {.score = ScoreFunction::sigmoid,
          .selection_bias = true,
          .n_groups = 8,
          .top_k_groups = 4,
          .group_score_top = 2,
          .routed_scaling_factor = 2.5};
}

}  // namespace presets
}  // namespace moe::routers
