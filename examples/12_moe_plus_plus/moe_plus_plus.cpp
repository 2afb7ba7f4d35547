/// \file moe_plus_plus.cpp
/// \brief MoE++ zero-computation experts (arXiv 2410.07348; PAPERS.md D.3, mechanisms in A.2): with zero,
/// copy and constant experts next to the FFN experts and the heterogeneous balance loss (τ on the
/// zero-computation experts), part of the (token, slot) assignments become "free", tokens use fewer than
/// K = 2 FFN experts, and the expert forward gets faster in proportion. Gating residuals (each layer's router
/// adds a learned map of the previous layer's logits) lower the variance of the routing scores.
///
/// Setup: a 3-layer moe::Stack, each layer 8 SwiGLU + 2 constant + 1 copy + 1 zero experts (MoE++'s order),
/// top-2 over the 12 with unrenormalised softmax weights (Eq. 1), trained on the domain mixture
/// (examples/common/domains.hpp: 4 domains, half the tokens easy) with the paper's heterogeneous balance loss
/// (Eq. 7, losses::MoEPlusPlusLoss{β = 0.01, τ}: f per token, no factor of the expert count) and heterogeneous
/// capacity (Eq. 8, CapacityLimited{γ = 1.1, heterogeneous_tau = τ}: an FFN expert takes τ times a
/// zero-computation expert's share; overflow slots are dropped), τ ∈ {0.1, 0.25, 0.5, 0.75, 1.0}, once with
/// gating residuals (CapacityLimited<WithLosses<GatingResidual<TopKRouter>>>) and once without (the same
/// router with no residual at all), plus a vanilla 8-FFN top-2 stack (the same loss and capacity with τ = 1)
/// for the loss and the timing baseline.
/// Throughput: the expert forward (PAPERS.md A.2: "expert forward throughput") of one MoE++ layer against
/// one vanilla layer at d = 256, d_ff = 512, 2048 tokens, min over repetitions. Both replay the routing
/// their trained d = 32 stack chose for the 2048 evaluation tokens (a replay router, so the comparison is
/// at the trained assignment mix; the router's own cost, a few % of one expert, is left out of both).
///
/// Criterion (PAPERS.md D.3), on the gating-residual arm at the paper's default τ = 0.75 where one τ is meant:
///   - mean FFN experts per token < 2;
///   - throughput gain (vanilla time / MoE++ time) within 15% of the vanilla layer's FFN experts per token (2 less its
///   capacity drops) over
///     the MoE++ layer's;
///   - the zero-computation share (mean over layers) falls monotonically as τ rises;
///   - gating residuals lower the variance of the routing scores across layers: for each evaluation token
///     and expert, the variance over the 3 layers of its softmax score, averaged over tokens, experts and
///     the τ sweep. (Also reported, not judged: the variance within each layer of the chosen slots' scores.)
///
/// Usage: moe_plus_plus [--quick] [--seed=S] [--out=DIR]
///   --quick  τ ∈ {0.1, 1.0}, 30 steps, timing at d = 64 (the ctest smoke test)
/// Writes moe_plus_plus_loss.csv, moe_plus_plus_shares.csv and moe_plus_plus_throughput.csv into DIR
/// (scripts/plot.py DIR plots them); prints a table per τ and ends with
///   RESULT moe_plus_plus PASS|FAIL ffn_per_token=... gain=... predicted_gain=... monotone=... xvar_res=...
///   xvar_plain=...

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <moe/moe.hpp>

#include "common/cli.hpp"
#include "common/domains.hpp"
#include "common/loss.hpp"
#include "common/stack_training.hpp"

namespace {

using T = float;
using moe::Index;
namespace routers = moe::routers;
namespace experts = moe::experts;

constexpr Index k_ffn = 8, k_experts = 12, k_top_k = 2;  // 8 FFN + 2 constant + 1 copy + 1 zero
constexpr std::size_t k_layers = 3;

using ResidualRouter = routers::CapacityLimited<
    routers::WithLosses<routers::GatingResidual<routers::TopKRouter<T>>, moe::losses::MoEPlusPlusLoss>>;
using PlainRouter = routers::CapacityLimited<routers::WithLosses<routers::TopKRouter<T>, moe::losses::MoEPlusPlusLoss>>;
template <class R>
using PlusLayer = moe::MoELayer<R, experts::SwiGLU<T>, experts::ConstantExperts<T>, experts::CopyExperts<T>,
                                experts::ZeroExperts<T>>;
using VanillaLayer = moe::MoELayer<PlainRouter, experts::SwiGLU<T>>;

// Replays a recorded routing: the timing layers then run exactly the assignments a trained stack chose.
class ReplayRouter {
 public:
  using Scalar = T;
  ReplayRouter(Index d_model, Index n_experts, std::vector<Index> ids, std::vector<T> weights)
      : d_(d_model), n_experts_(n_experts), ids_(std::move(ids)), weights_(std::move(weights)) {}
  Index d_model() const { return d_; }
  Index n_experts() const { return n_experts_; }
  Index top_k() const { return k_top_k; }
  using Saved = moe::NothingSaved;
  Saved carve_saved(moe::Arena&, Index) const { return {}; }
  void init(moe::Rng&) {}
  void route(const moe::RouteInput<T>& in, moe::RouteOutput<T, Saved>& out, moe::Arena& arena) const {
    if (arena.measuring()) return;
    if (std::size_t(in.n_tokens() * k_top_k) != ids_.size()) throw moe::Error("ReplayRouter: not the recorded tokens");
    std::copy(ids_.begin(), ids_.end(), out.ids);
    std::copy(weights_.begin(), weights_.end(), out.weights);
  }

 private:
  Index d_, n_experts_;
  std::vector<Index> ids_;
  std::vector<T> weights_;
};

struct Sizes {
  Index d, ff;          // trained stacks
  Index d_time, ff_time;  // timing layers
  long steps;
  Index batch_sequences, eval_sequences;
  int timing_reps;
};
constexpr Index k_seq_len = 32;

moe::MoEConfig shape(Index d, Index ff, Index n) { return {.d_model = d, .d_ff = ff, .n_experts = n, .top_k = k_top_k}; }

// The paper's loss (Eq. 7, β = 0.01) and heterogeneous capacity (Eq. 8, γ = 1.1), both with the arm's τ.
template <class R>
R make_router(const Sizes& s, Index n_experts, double tau) {
  routers::TopKRouter<T> top_k(shape(s.d, s.ff, n_experts), {.renormalize = false});
  const moe::losses::MoEPlusPlusLoss loss{.coeff = 1e-2, .tau = tau};
  const routers::CapacityOptions capacity{.capacity_factor = 1.1, .heterogeneous_tau = tau};
  if constexpr (std::is_same_v<R, ResidualRouter>) {
    return R(routers::WithLosses(routers::GatingResidual(std::move(top_k)), loss), capacity);
  } else {
    return R(routers::WithLosses(std::move(top_k), loss), capacity);
  }
}

template <class R>
moe::Stack<PlusLayer<R>> plus_stack(const Sizes& s, double tau, std::uint64_t seed) {
  std::vector<PlusLayer<R>> layers;
  for (std::size_t l = 0; l < k_layers; ++l)
    layers.emplace_back(make_router<R>(s, k_experts, tau), experts::SwiGLU<T>(shape(s.d, s.ff, k_ffn)),
                        experts::ConstantExperts<T>(2, s.d), experts::CopyExperts<T>(1, s.d),
                        experts::ZeroExperts<T>(1, s.d));
  moe::Stack<PlusLayer<R>> stack(std::move(layers));
  stack.init(seed);
  return stack;
}

moe::Stack<VanillaLayer> vanilla_stack(const Sizes& s, std::uint64_t seed) {
  std::vector<VanillaLayer> layers;
  for (std::size_t l = 0; l < k_layers; ++l)
    layers.emplace_back(make_router<PlainRouter>(s, k_ffn, 1.0), experts::SwiGLU<T>(shape(s.d, s.ff, k_ffn)));
  moe::Stack<VanillaLayer> stack(std::move(layers));
  stack.init(seed);
  return stack;
}

// Per layer, on the evaluation batch: the shares of the (token, slot) pairs per kind of expert, FFN experts
// per token, the variance of the chosen slots' routing scores, and the routing itself (for the replay).
struct LayerRouting {
  double zero = 0, copy = 0, constant = 0, ffn_per_token = 0, score_var = 0;
  std::vector<Index> ids;
  std::vector<T> weights;
  double zero_computation() const { return zero + copy + constant; }
};
struct Outcome {
  double eval_loss = 0;
  double cross_layer_var = 0;  // variance over layers of each token's score of each expert
  std::vector<LayerRouting> layers;
  double mean(double LayerRouting::*field) const {
    double s = 0;
    for (const auto& l : layers) s += l.*field;
    return s / double(layers.size());
  }
  double mean_zero_computation() const {
    double s = 0;
    for (const auto& l : layers) s += l.zero_computation();
    return s / double(layers.size());
  }
};

// Each layer's full routing-score vectors softmax(z_l) (n_tokens, n_experts) on x, from a layer-by-layer
// pass (h_{l+1} = h_l + MoE_l(h_l)) that passes a gating-residual router the previous layer's logits as
// moe::Stack does (moe::LayerLinks); checked against the routing the stack itself chose (`ctx`).
template <class Layer>
std::vector<moe::RowMatrix<double>> routing_scores(moe::Stack<Layer>& stack, const moe::RowMatrix<T>& x,
                                                   const moe::StackContext<T>& ctx) {
  const Index n = x.rows(), E = stack.layer(0).n_experts();
  moe::RowMatrix<T> h = x, y(n, x.cols()), z(n, E), previous;  // z, previous: (n_tokens, n_experts)
  moe::Workspace ws;
  std::vector<moe::RowMatrix<double>> scores;
  for (std::size_t l = 0; l < stack.n_layers(); ++l) {
    moe::LayerLinks<T> links;
    if constexpr (moe::links_logits<typename Layer::RouterType>) {  // the router writes its logits into z
      if (l > 0) links.previous_logits = moe::ConstMatrixView<T>(previous);
      links.logits = moe::MatrixView<T>(z);
    } else {
      const auto& router = std::as_const(stack.layer(l)).router().inner().inner();
      for (Index t = 0; t < n; ++t)
        for (Index e = 0; e < E; ++e) {
          T acc = 0;
          for (Index j = 0; j < h.cols(); ++j) acc += h(t, j) * router.gate()(e, j);
          z(t, e) = acc;
        }
    }
    const auto r = stack.layer(l).forward(h, y, ws, {}, links);
    if (!std::equal(r.expert_ids.begin(), r.expert_ids.end(), ctx.result(l).expert_ids.begin()))
      throw moe::Error("moe_plus_plus: the layer-by-layer pass disagrees with Stack::forward");
    moe::RowMatrix<double> p = z.cast<double>();
    for (Index t = 0; t < n; ++t) {
      p.row(t) = (p.row(t).array() - p.row(t).maxCoeff()).exp().matrix();
      p.row(t) /= p.row(t).sum();
    }
    scores.push_back(std::move(p));
    previous = z;
    h += y;
  }
  return scores;
}

// Variance over the layers of each (token, expert) routing score, averaged over tokens and experts.
double cross_layer_variance(const std::vector<moe::RowMatrix<double>>& scores) {
  const double L = double(scores.size());
  moe::RowMatrix<double> mean = moe::RowMatrix<double>::Zero(scores[0].rows(), scores[0].cols());
  for (const auto& p : scores) mean += p / L;
  double var = 0;
  for (const auto& p : scores) var += (p - mean).squaredNorm() / L;
  return var / double(mean.size());
}

// The domain mixture of PAPERS.md D (examples/common/domains.hpp): |μ_d| = sqrt(d), tanh targets of width d
// on top of the residual x, the difficulty flagged as ±2 on the last coordinate.
moe::examples::DomainOptions domain_options(Index d, double easy_fraction) {
  return {.n_domains = 4, .d_model = d, .hidden = d, .mean_norm = std::sqrt(double(d)), .tanh_gain = 2,
          .target_scale = 1, .linear_scale = 0.5, .easy_fraction = easy_fraction, .difficulty_shift = 2,
          .residual = true};
}

template <class Layer>
Outcome train(moe::Stack<Layer>& stack, const moe::examples::DomainGenerator<T>& data, const Sizes& s,
              const std::string& name, std::uint64_t seed, std::ofstream& loss_csv) {
  moe::examples::train_stack(stack, data, s.steps, s.batch_sequences, k_seq_len, name, seed, loss_csv);
  moe::StackContext<T> ctx;
  moe::RowMatrix<T> y, dy;
  moe::Rng eval_rng(seed ^ 0x5eedULL);  // the same evaluation batch for every arm of a seed
  const auto eval = data.sample(s.eval_sequences, k_seq_len, eval_rng);
  y.resize(eval.x.rows(), eval.x.cols());
  stack.forward(eval.x, y, ctx);
  Outcome out;
  out.eval_loss = moe::examples::mse(y, eval.target, dy);
  out.cross_layer_var = cross_layer_variance(routing_scores(stack, eval.x, ctx));
  for (std::size_t l = 0; l < k_layers; ++l) {
    const auto& r = ctx.result(l);
    moe::RoutingStats stats(stack.layer(l));
    stats.record(r);
    LayerRouting lr;
    const auto& counts = stats.tokens_per_expert();
    const double slots = double(r.n_tokens * r.top_k);
    const auto share = [&](Index first, Index last) {
      long c = 0;
      for (Index e = first; e < last && e < stats.n_experts(); ++e) c += counts[std::size_t(e)];
      return double(c) / slots;
    };
    lr.constant = share(k_ffn, k_ffn + 2);
    lr.copy = share(k_ffn + 2, k_ffn + 3);
    lr.zero = share(k_ffn + 3, k_ffn + 4);
    lr.ffn_per_token = stats.mean_real_experts_per_token();
    double mean = 0, sq = 0;
    for (T w : r.expert_weights) mean += double(w);
    mean /= slots;
    for (T w : r.expert_weights) sq += (double(w) - mean) * (double(w) - mean);
    lr.score_var = sq / slots;
    lr.ids.assign(r.expert_ids.begin(), r.expert_ids.end());
    lr.weights.assign(r.expert_weights.begin(), r.expert_weights.end());
    out.layers.push_back(std::move(lr));
  }
  return out;
}

// Seconds of the fastest of `reps` forwards of each layer, run alternately so both see the same load.
template <class A, class B>
std::pair<double, double> time_pair(const A& a, const B& b, const moe::RowMatrix<T>& x, int reps) {
  moe::RowMatrix<T> y(x.rows(), x.cols());
  moe::Workspace wa, wb;
  a.forward(x, y, wa);  // warm-up: grows the workspaces
  b.forward(x, y, wb);
  double ta = 1e30, tb = 1e30;
  const auto seconds = [&](const auto& layer, moe::Workspace& ws) {
    const auto start = std::chrono::steady_clock::now();
    layer.forward(x, y, ws);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  for (int r = 0; r < reps; ++r) {
    ta = std::min(ta, seconds(a, wa));
    tb = std::min(tb, seconds(b, wb));
  }
  return {ta, tb};
}

struct Timing {
  std::vector<double> plus_seconds, vanilla_seconds;  // per layer
  double gain() const {
    double p = 0, v = 0;
    for (std::size_t l = 0; l < plus_seconds.size(); ++l) p += plus_seconds[l], v += vanilla_seconds[l];
    return v / p;
  }
};

Timing time_layers(const Outcome& plus, const Outcome& vanilla, const Sizes& s, std::uint64_t seed) {
  using PlusTimed = moe::MoELayer<ReplayRouter, experts::SwiGLU<T>, experts::ConstantExperts<T>,
                                  experts::CopyExperts<T>, experts::ZeroExperts<T>>;
  using VanillaTimed = moe::MoELayer<ReplayRouter, experts::SwiGLU<T>>;
  const Index n = s.eval_sequences * k_seq_len, d = s.d_time;
  moe::Rng rng(seed);
  moe::RowMatrix<T> x(n, d);  // (n_tokens, d_model)
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(rng.normal());
  Timing t;
  for (std::size_t l = 0; l < k_layers; ++l) {
    PlusTimed a(ReplayRouter(d, k_experts, plus.layers[l].ids, plus.layers[l].weights),
                experts::SwiGLU<T>(shape(d, s.ff_time, k_ffn)), experts::ConstantExperts<T>(2, d),
                experts::CopyExperts<T>(1, d), experts::ZeroExperts<T>(1, d));
    VanillaTimed b(ReplayRouter(d, k_ffn, vanilla.layers[l].ids, vanilla.layers[l].weights),
                   experts::SwiGLU<T>(shape(d, s.ff_time, k_ffn)));
    a.init(seed + l);
    b.init(seed + l);
    const auto [ta, tb] = time_pair(a, b, x, s.timing_reps);
    t.plus_seconds.push_back(ta);
    t.vanilla_seconds.push_back(tb);
  }
  return t;
}

void write_shares(std::ofstream& csv, const char* arm, double tau, const Outcome& o) {
  for (std::size_t l = 0; l < o.layers.size(); ++l) {
    const auto& r = o.layers[l];
    csv << arm << ',' << tau << ',' << l << ',' << r.zero << ',' << r.copy << ',' << r.constant << ','
        << r.ffn_per_token << ',' << r.score_var << ',' << o.cross_layer_var << ',' << o.eval_loss << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "moe_plus_plus [--quick] [--seed=S] [--out=DIR]");
  const Sizes s = cli.quick ? Sizes{16, 32, 64, 128, 30, 2, 8, 2} : Sizes{32, 64, 256, 512, 600, 8, 64, 11};
  const std::vector<double> taus = cli.quick ? std::vector<double>{0.1, 1.0}
                                             : std::vector<double>{0.1, 0.25, 0.5, 0.75, 1.0};
  const double default_tau = cli.quick ? 1.0 : 0.75;  // MoE++'s default (Sec. 4.3)
  const moe::examples::DomainGenerator<T> data(domain_options(s.d, 0.5), cli.seed);

  auto loss_csv = moe::examples::open_csv(cli, "moe_plus_plus_loss.csv");
  loss_csv << "model,step,loss\n";
  auto shares_csv = moe::examples::open_csv(cli, "moe_plus_plus_shares.csv");
  shares_csv << "arm,tau,layer,zero,copy,constant,ffn_per_token,score_var,cross_layer_var,eval_loss\n";
  auto time_csv = moe::examples::open_csv(cli, "moe_plus_plus_throughput.csv");
  time_csv << "tau,layer,ffn_per_token,moepp_tokens_per_s,vanilla_tokens_per_s,gain,predicted_gain\n";

  // Every arm starts from the same seed: differences come from the router and τ only.
  const std::uint64_t init_seed = cli.seed + 1, loop_seed = cli.seed + 2;
  auto vanilla = vanilla_stack(s, init_seed);
  const Outcome base = train(vanilla, data, s, "vanilla", loop_seed, loss_csv);
  write_shares(shares_csv, "vanilla", 0, base);

  std::printf("%-8s %5s  %6s %6s %6s %6s  %8s  %9s  %9s  %9s  %7s  %9s\n", "arm", "tau", "zero", "copy", "const",
              "ZC", "FFN/tok", "score var", "xlayer var", "eval loss", "gain", "predicted");
  std::printf("%-8s %5s  %6s %6s %6s %6s  %8.3f  %9.2e  %9.2e  %9.4f\n", "vanilla", "-", "-", "-", "-", "-",
              base.mean(&LayerRouting::ffn_per_token), base.mean(&LayerRouting::score_var), base.cross_layer_var,
              base.eval_loss);
  std::vector<Outcome> res, plain;
  std::vector<double> gains;
  for (double tau : taus) {
    const std::string suffix = "_tau" + std::to_string(tau).substr(0, 4);
    auto a = plus_stack<ResidualRouter>(s, tau, init_seed);
    res.push_back(train(a, data, s, "residual" + suffix, loop_seed, loss_csv));
    auto b = plus_stack<PlainRouter>(s, tau, init_seed);
    plain.push_back(train(b, data, s, "plain" + suffix, loop_seed, loss_csv));
    write_shares(shares_csv, "residual", tau, res.back());
    write_shares(shares_csv, "plain", tau, plain.back());

    const Timing t = time_layers(res.back(), base, s, cli.seed + 3);
    const double n = double(s.eval_sequences * k_seq_len);
    double plus_total = 0, vanilla_total = 0;
    for (std::size_t l = 0; l < k_layers; ++l) {
      const double f = res.back().layers[l].ffn_per_token;
      const double g = t.vanilla_seconds[l] / t.plus_seconds[l];
      time_csv << tau << ',' << l << ',' << f << ',' << n / t.plus_seconds[l] << ',' << n / t.vanilla_seconds[l] << ','
               << g << ',' << base.layers[l].ffn_per_token / f << '\n';
      plus_total += t.plus_seconds[l];
      vanilla_total += t.vanilla_seconds[l];
    }
    const double f = res.back().mean(&LayerRouting::ffn_per_token), vanilla_f = base.mean(&LayerRouting::ffn_per_token);
    gains.push_back(t.gain());
    time_csv << tau << ",all," << f << ',' << 3 * n / plus_total << ',' << 3 * n / vanilla_total << ',' << t.gain()
             << ',' << vanilla_f / f << '\n';
    for (const auto* o : {&res.back(), &plain.back()}) {
      const bool r = o == &res.back();
      std::printf("%-8s %5.2f  %6.3f %6.3f %6.3f %6.3f  %8.3f  %9.2e  %9.2e  %9.4f", r ? "residual" : "plain", tau,
                  o->mean(&LayerRouting::zero), o->mean(&LayerRouting::copy), o->mean(&LayerRouting::constant),
                  o->mean_zero_computation(), o->mean(&LayerRouting::ffn_per_token), o->mean(&LayerRouting::score_var),
                  o->cross_layer_var, o->eval_loss);
      if (r) std::printf("  %7.3f  %9.3f", t.gain(), vanilla_f / f);
      std::printf("\n");
    }
  }

  const auto at = std::find(taus.begin(), taus.end(), default_tau) - taus.begin();
  const Outcome& main_arm = res[std::size_t(at)];
  // The vanilla layer's FFN experts per token (below 2 where its capacity drops slots) over the MoE++ layer's.
  const double ffn = main_arm.mean(&LayerRouting::ffn_per_token), gain = gains[std::size_t(at)],
               predicted = base.mean(&LayerRouting::ffn_per_token) / ffn;
  bool monotone = true;
  for (std::size_t i = 1; i < res.size(); ++i)
    monotone &= res[i].mean_zero_computation() <= res[i - 1].mean_zero_computation();
  double xvar_res = 0, xvar_plain = 0, var_res = 0, var_plain = 0;
  int lower = 0;
  for (std::size_t i = 0; i < res.size(); ++i) {
    const double k = 1.0 / double(res.size());
    xvar_res += k * res[i].cross_layer_var;
    xvar_plain += k * plain[i].cross_layer_var;
    var_res += k * res[i].mean(&LayerRouting::score_var);
    var_plain += k * plain[i].mean(&LayerRouting::score_var);
    lower += res[i].cross_layer_var < plain[i].cross_layer_var ? 1 : 0;
  }
  const bool pass = ffn < 2 && std::abs(gain / predicted - 1) <= 0.15 && monotone && xvar_res < xvar_plain;
  std::printf(
      "tau %.2f with gating residuals: %.3f FFN experts per token, expert-forward gain %.3fx (vanilla FFN / FFN = "
      "%.3fx); "
      "residuals lower the cross-layer score variance at %d of %zu tau\n",
      default_tau, ffn, gain, predicted, lower, res.size());
  std::printf("wrote %s/moe_plus_plus_{loss,shares,throughput}.csv\n", cli.out.c_str());
  moe::examples::report("moe_plus_plus", pass,
                        {{"ffn_per_token", ffn},
                         {"gain", gain},
                         {"predicted_gain", predicted},
                         {"gain_error", gain / predicted - 1},
                         {"monotone", monotone ? 1.0 : 0.0},
                         {"zc_share_tau_min", res.front().mean_zero_computation()},
                         {"zc_share_tau_max", res.back().mean_zero_computation()},
                         {"xvar_res", xvar_res},
                         {"xvar_plain", xvar_plain},
                         {"xvar_lower_count", double(lower)},
                         {"var_res", var_res},
                         {"var_plain", var_plain},
                         {"loss_moepp", main_arm.eval_loss},
                         {"loss_vanilla", base.eval_loss}});
  return 0;
}
