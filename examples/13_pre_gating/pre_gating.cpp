/// \file pre_gating.cpp
/// \brief Prefetch hit rate of next-layer expert predictors (Pre-gated MoE, arXiv 2308.12066; EdgeMoE,
/// arXiv 2308.14352; PAPERS.md D.8, mechanisms in A.9): can the experts layer l+1 will use be known early
/// enough to fetch their weights while layer l computes?
///
/// Setup: the domain mixture of D.1 (examples/common/domains.hpp: 4 domains, sequences of 32 tokens
/// from one domain, nonlinear targets); two 4-layer moe::Stacks of E = 8 SwiGLU experts, top-2, SwitchLoss
/// (coeff 1e-2), trained on the same batches from the same initialisation:
///   - pre-gated (StackOptions{.pre_gating = true}): layer l+1 routes on h_l, the input of layer l;
///   - conventional: every layer routes on its own input.
/// Predictors of layer m's experts (m = 1..3), per token (batch size 1, as Pre-gated MoE evaluates), each
/// prefetching a set of P experts, P ∈ {K, 2K}:
///   A  the pre-gate of the pre-gated stack: the top-P of layer m's router on h_{m-1}, delivered by
///      Stack::set_prefetch before layer m-1 runs. Layer m then routes on exactly that input, so its hit
///      rate is 1 by construction for P >= K: the price of pre-gating is paid in task loss instead, which
///      is reported (pre-gated vs conventional evaluation loss).
///   A0 the same shifted gate on the conventional stack (no pre-gating training): what prefetching on
///      h_{m-1} gives when the model was not trained for it.
///   B  a co-activation table (EdgeMoE-style profiling) of the conventional stack: on a separate profiling
///      batch, count[i][j] = tokens that used expert i in layer m-1 and j in layer m; a token's prefetch is
///      the top-P experts j by sum over its layer-(m-1) experts i of count[i][j] (known once layer m-1 has
///      routed, i.e. one expert-compute of lookahead).
/// Hit rate = |prefetched ∩ used| / K, averaged over tokens and layers 1..3; a random set of P has P/E.
///
/// Criterion (PAPERS.md D.8), judged on predictor B (A is 1 by construction): hit rate at P = 2K >= 0.8
/// (which is >= 1.6x the random P/E = 0.5).
///
/// Usage: pre_gating [--quick] [--seed=S] [--out=DIR]
///   --quick  40 steps, d = 16 (the ctest smoke test)
/// Writes pre_gating_loss.csv and pre_gating_hit_rate.csv into DIR (scripts/plot.py DIR plots them); ends with
///   RESULT pre_gating PASS|FAIL hit_B_2K=... hit_B_K=... hit_A0_K=... hit_A_K=... loss_ratio=...

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include <moe/moe.hpp>

#include "common/cli.hpp"
#include "common/domains.hpp"
#include "common/loss.hpp"
#include "common/stack_training.hpp"

namespace {

using T = float;
using moe::Index;
using Router = moe::routers::WithLosses<moe::routers::TopKRouter<T>, moe::losses::SwitchLoss>;
using Layer = moe::MoELayer<Router, moe::experts::SwiGLU<T>>;

constexpr Index k_experts = 8, k_top_k = 2, k_seq_len = 32;
constexpr std::size_t k_layers = 4;

struct Sizes {
  Index d, ff;
  long steps;
  Index batch_sequences, eval_sequences, profile_sequences;
};

// The domain mixture of PAPERS.md D (examples/common/domains.hpp): |μ_d| = sqrt(d), tanh targets of width d
// on top of the residual x, the difficulty flagged as ±2 on the last coordinate.
moe::examples::DomainOptions domain_options(Index d, double easy_fraction) {
  return {.n_domains = 4, .d_model = d, .hidden = d, .mean_norm = std::sqrt(double(d)), .tanh_gain = 2,
          .target_scale = 1, .linear_scale = 0.5, .easy_fraction = easy_fraction, .difficulty_shift = 2,
          .residual = true};
}

moe::Stack<Layer> make_stack(const Sizes& s, bool pre_gating, std::uint64_t seed) {
  const moe::MoEConfig cfg{.d_model = s.d, .d_ff = s.ff, .n_experts = k_experts, .top_k = k_top_k};
  std::vector<Layer> layers;
  for (std::size_t l = 0; l < k_layers; ++l)
    layers.emplace_back(Router(moe::routers::TopKRouter<T>(cfg), moe::losses::SwitchLoss{.coeff = 1e-2}),
                        moe::experts::SwiGLU<T>(cfg));
  moe::Stack<Layer> stack(std::move(layers), {.pre_gating = pre_gating});
  stack.init(seed);
  return stack;
}

// What one inference pass exposes to the predictors: each layer's input h_l and the experts it used.
struct Trace {
  std::vector<moe::RowMatrix<T>> h;        // h_0 .. h_{L-1}, (n_tokens, d_model) each
  std::vector<std::vector<Index>> used;    // per layer, (n_tokens, top_k) expert ids
  moe::RowMatrix<T> out;                   // h_L
};

// Runs the stack layer by layer with the public layer API (h_{l+1} = h_l + MoE_l(h_l); a pre-gated layer
// l > 0 routes on h_{l-1}), so the predictors can read every h_l; checked against Stack::forward's routing.
Trace trace(moe::Stack<Layer>& stack, const moe::RowMatrix<T>& x) {
  Trace t;
  moe::Workspace ws;
  moe::RowMatrix<T> y(x.rows(), x.cols());
  t.h.push_back(x);
  for (std::size_t l = 0; l < k_layers; ++l) {
    const bool early = stack.options().pre_gating && l > 0;
    moe::LayerLinks<T> links;
    if (early) links.router_input = moe::ConstMatrixView<T>(t.h[l - 1]);  // the router reads the layer before's input
    const auto r = stack.layer(l).forward(t.h[l], y, ws, {}, links);
    t.used.emplace_back(r.expert_ids.begin(), r.expert_ids.end());
    const moe::RowMatrix<T> next = t.h[l] + y;
    if (l + 1 < k_layers) t.h.push_back(next); else t.out = next;
  }
  moe::StackContext<T> ctx;
  stack.forward(x, y, ctx);
  for (std::size_t l = 0; l < k_layers; ++l)
    if (!std::equal(t.used[l].begin(), t.used[l].end(), ctx.result(l).expert_ids.begin()))
      throw moe::Error("pre_gating: the layer-by-layer pass disagrees with Stack::forward");
  return t;
}

// The top-P experts of each token by score (ties: lower id), scores (n_tokens, n_experts).
std::vector<std::vector<Index>> top_p(const moe::RowMatrix<double>& scores, Index p) {
  std::vector<std::vector<Index>> sets(std::size_t(scores.rows()));
  for (Index t = 0; t < scores.rows(); ++t) {
    std::vector<Index> ids(std::size_t(scores.cols()));
    std::iota(ids.begin(), ids.end(), Index(0));
    std::stable_sort(ids.begin(), ids.end(), [&](Index a, Index b) { return scores(t, a) > scores(t, b); });
    sets[std::size_t(t)].assign(ids.begin(), ids.begin() + p);
  }
  return sets;
}

// Layer l's router logits on h: h W_gᵀ (softmax is monotone, so its top-P are the scores' top-P).
moe::RowMatrix<double> logits(const Layer& layer, const moe::RowMatrix<T>& h) {
  const auto gate = layer.router().inner().gate();  // (n_experts, d_model)
  moe::RowMatrix<double> z(h.rows(), k_experts);
  for (Index t = 0; t < h.rows(); ++t)
    for (Index e = 0; e < k_experts; ++e) {
      double acc = 0;
      for (Index j = 0; j < h.cols(); ++j) acc += double(h(t, j)) * double(gate(e, j));
      z(t, e) = acc;
    }
  return z;
}

// Mean over tokens of |prefetched ∩ used| / K.
double hit_rate(const std::vector<std::vector<Index>>& prefetched, const std::vector<Index>& used) {
  double hits = 0;
  for (std::size_t t = 0; t < prefetched.size(); ++t)
    for (Index s = 0; s < k_top_k; ++s)
      hits += std::count(prefetched[t].begin(), prefetched[t].end(), used[t * k_top_k + std::size_t(s)]) > 0;
  return hits / double(prefetched.size() * k_top_k);
}

// count[m][i][j]: tokens that used expert i in layer m-1 and expert j in layer m (m = 1 .. L-1).
using CoActivation = std::vector<moe::RowMatrix<double>>;

CoActivation profile(const Trace& t) {
  CoActivation c(k_layers, moe::RowMatrix<double>::Zero(k_experts, k_experts));
  const std::size_t n = t.used[0].size() / k_top_k;
  for (std::size_t m = 1; m < k_layers; ++m)
    for (std::size_t tok = 0; tok < n; ++tok)
      for (Index a = 0; a < k_top_k; ++a)
        for (Index b = 0; b < k_top_k; ++b)
          c[m](t.used[m - 1][tok * k_top_k + a], t.used[m][tok * k_top_k + b]) += 1;
  return c;
}

// Predictor B's scores for layer m: per token, the sum of the table rows of its layer-(m-1) experts.
moe::RowMatrix<double> coactivation_scores(const CoActivation& c, const Trace& t, std::size_t m) {
  const std::size_t n = t.used[0].size() / k_top_k;
  moe::RowMatrix<double> s = moe::RowMatrix<double>::Zero(Index(n), k_experts);
  for (std::size_t tok = 0; tok < n; ++tok)
    for (Index a = 0; a < k_top_k; ++a) s.row(Index(tok)) += c[m].row(t.used[m - 1][tok * k_top_k + a]);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "pre_gating [--quick] [--seed=S] [--out=DIR]");
  const Sizes s = cli.quick ? Sizes{16, 32, 40, 4, 8, 16} : Sizes{32, 64, 800, 8, 64, 128};
  const moe::examples::DomainGenerator<T> data(domain_options(s.d, 0.0), cli.seed);

  auto loss_csv = moe::examples::open_csv(cli, "pre_gating_loss.csv");
  loss_csv << "model,step,loss\n";
  auto pregated = make_stack(s, true, cli.seed + 1);
  auto conventional = make_stack(s, false, cli.seed + 1);
  moe::examples::train_stack(pregated, data, s.steps, s.batch_sequences, k_seq_len, "pre-gated", cli.seed + 2,
                             loss_csv);
  moe::examples::train_stack(conventional, data, s.steps, s.batch_sequences, k_seq_len, "conventional", cli.seed + 2,
                             loss_csv);

  moe::Rng eval_rng(cli.seed + 3), profile_rng(cli.seed + 4);
  const auto eval = data.sample(s.eval_sequences, k_seq_len, eval_rng);
  const auto profiling = data.sample(s.profile_sequences, k_seq_len, profile_rng);

  // Predictor A through the library's hook: the routing of layer m, handed over before layer m-1 runs.
  std::vector<std::vector<Index>> prefetched(k_layers);
  pregated.set_prefetch([&](std::size_t l, const moe::ForwardResult<T>& routing) {
    prefetched[l].assign(routing.expert_ids.begin(), routing.expert_ids.end());
  });
  const Trace a = trace(pregated, eval.x);
  pregated.set_prefetch({});
  const Trace b = trace(conventional, eval.x);
  const CoActivation table = profile(trace(conventional, profiling.x));
  moe::RowMatrix<T> dy;
  const double loss_pregated = moe::examples::mse(a.out, eval.target, dy);
  const double loss_conventional = moe::examples::mse(b.out, eval.target, dy);

  auto hit_csv = moe::examples::open_csv(cli, "pre_gating_hit_rate.csv");
  hit_csv << "predictor,P,layer,hit_rate,random\n";
  const char* const names[] = {"A_pregate", "A0_shifted_gate", "B_coactivation"};
  double mean[3][2] = {};  // [predictor][P = K, 2K]
  for (int pi = 0; pi < 2; ++pi) {
    const Index p = k_top_k * (pi + 1);
    const double random = double(p) / double(k_experts);
    for (std::size_t m = 1; m < k_layers; ++m) {
      std::vector<std::vector<Index>> hook_sets(a.used[m].size() / k_top_k);
      for (std::size_t t = 0; t < hook_sets.size(); ++t)
        hook_sets[t].assign(prefetched[m].begin() + std::ptrdiff_t(t * k_top_k),
                            prefetched[m].begin() + std::ptrdiff_t((t + 1) * k_top_k));
      // P = K: the hook's own sets; P = 2K: the pre-gate's top-2K (a superset of what the hook delivers).
      const double hit[3] = {
          hit_rate(p == k_top_k ? hook_sets : top_p(logits(pregated.layer(m), a.h[m - 1]), p), a.used[m]),
          hit_rate(top_p(logits(conventional.layer(m), b.h[m - 1]), p), b.used[m]),
          hit_rate(top_p(coactivation_scores(table, b, m), p), b.used[m])};
      for (int k = 0; k < 3; ++k) {
        hit_csv << names[k] << ',' << p << ',' << m << ',' << hit[k] << ',' << random << '\n';
        mean[k][pi] += hit[k] / double(k_layers - 1);
      }
    }
    for (int k = 0; k < 3; ++k) hit_csv << names[k] << ',' << p << ",all," << mean[k][pi] << ',' << random << '\n';
  }

  std::printf("prefetch hit rate (mean over layers 1..3, per token):\n");
  std::printf("  %-16s  P=K=2   P=2K=4\n", "predictor");
  for (int k = 0; k < 3; ++k) std::printf("  %-16s  %5.3f   %5.3f\n", names[k], mean[k][0], mean[k][1]);
  std::printf("  %-16s  %5.3f   %5.3f\n", "random P/E", double(k_top_k) / k_experts, 2.0 * k_top_k / k_experts);
  std::printf("evaluation loss: pre-gated %.4f, conventional %.4f (ratio %.3f)\n", loss_pregated, loss_conventional,
              loss_pregated / loss_conventional);
  std::printf("wrote %s/pre_gating_{loss,hit_rate}.csv\n", cli.out.c_str());
  const bool pass = mean[2][1] >= 0.8;
  moe::examples::report("pre_gating", pass,
                        {{"hit_B_2K", mean[2][1]},
                         {"hit_B_K", mean[2][0]},
                         {"hit_A0_2K", mean[1][1]},
                         {"hit_A0_K", mean[1][0]},
                         {"hit_A_K", mean[0][0]},
                         {"hit_A_2K", mean[0][1]},
                         {"random_2K", 2.0 * k_top_k / k_experts},
                         {"loss_pregated", loss_pregated},
                         {"loss_conventional", loss_conventional},
                         {"loss_ratio", loss_pregated / loss_conventional}});
  return 0;
}
