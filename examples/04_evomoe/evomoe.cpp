/// \file evomoe.cpp
/// \brief Reproduces EvoMoE's dense-to-sparse training (arXiv 2112.14397; PAPERS.md A.4, experiment D.4): the
/// claim that the DTS gate starts dense, becomes sparser as its temperature τ decays and ends at top-1, with
/// a lower loss than a Switch top-1 layer trained from scratch for the same number of steps.
///
/// Task: the mixture-of-regimes regression of examples/common/regimes.hpp (d_model = 32, 8 regimes).
/// Phase 1 (expert-diversify) trains one SwiGLU expert as a dense FFN, then spawns E = 8 experts from it,
/// each keeping a random 75% of the base expert's weights (random masking). Phase 2 (gate-sparsify) trains
/// them under routers::DenseToSparseGate (γ = 0.001, τ exponential 1.0 -> 0.5 over the soft phase, combine
/// weights from the Gumbel-softmax G: the official code's use_gumbel_gates), then switches to hard top-1 for
/// the rest of the budget. Budget: 500 dense + 2000 soft + 500 hard steps of 256 tokens, AdamW lr 1e-2
/// throughout; the loss compared is the MSE on 4096 held-out tokens in evaluation mode. Two baselines of the same
/// active FLOPs at inference (one SwiGLU expert of d_ff 64 per token), trained from scratch for the whole budget,
/// each at the best of three learning rates (1e-3, 3e-3, 1e-2, chosen on the held-out loss):
///   - Switch top-1: routers::TopKRouter with presets::switch_transformer (top-1 of 8) + SwitchLoss 1e-2;
///   - dense: one SwiGLU FFN of d_ff 64 (the phase-1 model, trained for the whole budget).
///
/// Usage: evomoe [--quick] [--seed=S] [--out=DIR]
///   --quick  a shortened run (the ctest smoke test)
/// Writes DIR/evomoe_active.csv (step,active_experts,tau: mean experts per token with G_i > γ, phase 2) and
/// DIR/evomoe_loss.csv (model,step,loss: training MSE per step); scripts/plot.py DIR plots both.
/// Ends with
///   RESULT evomoe PASS|FAIL start_active=.. spearman=.. hard_active=.. loss=.. switch_loss=.. dense_loss=..
/// PASS when start_active >= 7 (near E = 8), spearman < -0.9 (active count against step over the soft
/// phase) and the held-out MSE of EvoMoE <= that of both baselines. (hard_active, 1 by construction after the
/// hard switch, is reported but not judged.)

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <moe/moe.hpp>

#include "common/cli.hpp"
#include "common/regime_training.hpp"

namespace {

using T = double;
using Bank = moe::experts::SwiGLU<T>;
using DtsLayer = moe::MoELayer<moe::routers::DenseToSparseGate<T>, Bank>;
using TopKLayer = moe::MoELayer<moe::routers::TopKRouter<T>, Bank>;
using SwitchLayer = moe::MoELayer<moe::routers::WithLosses<moe::routers::TopKRouter<T>, moe::losses::SwitchLoss>, Bank>;

constexpr moe::Index k_d_model = 32, k_d_ff = 64, k_experts = 8, k_batch = 256;
constexpr double k_mask_ratio = 0.25;  // share of the base expert's weights each spawned expert drops
constexpr double k_lr = 1e-2;          // AdamW, every phase of EvoMoE
constexpr double k_baseline_lrs[] = {1e-3, 3e-3, 1e-2};  // each baseline's best of these (they bracket it)

struct Budget {
  long dense_steps, soft_steps, hard_steps;
  long total() const { return dense_steps + soft_steps + hard_steps; }
};

// The router that owns the training noise and step: the layer's, or the one inside its WithLosses.
template <class Layer>
auto& noisy_router(Layer& layer) {
  if constexpr (std::is_same_v<Layer, SwitchLayer>) {
    return layer.router().inner();
  } else {
    return layer.router();
  }
}

// Held-out MSE in evaluation mode (DTS gate and Switch router: top-1 of softmax(z), no noise).
template <class Layer>
double eval_mse(Layer& layer, const moe::examples::Regimes& test) {
  noisy_router(layer).set_training(false);
  return moe::examples::held_out_mse(layer, test);
}

// Ranks with ties averaged (for Spearman's ρ).
std::vector<double> ranks(const std::vector<double>& v) {
  std::vector<std::size_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < order.size();) {
    std::size_t j = i;
    while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
    for (std::size_t m = i; m <= j; ++m) r[order[m]] = 0.5 * double(i + j);
    i = j + 1;
  }
  return r;
}

// Spearman's ρ of the series against its index: the Pearson correlation of the ranks.
double spearman_against_step(const std::vector<double>& series) {
  std::vector<double> steps(series.size());
  std::iota(steps.begin(), steps.end(), 0.0);
  const auto a = ranks(series), b = ranks(steps);
  const double n = double(a.size()), ma = std::accumulate(a.begin(), a.end(), 0.0) / n,
               mb = std::accumulate(b.begin(), b.end(), 0.0) / n;
  double sab = 0, saa = 0, sbb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    sab += (a[i] - ma) * (b[i] - mb);
    saa += (a[i] - ma) * (a[i] - ma);
    sbb += (b[i] - mb) * (b[i] - mb);
  }
  return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0.0;
}

// Expert-diversify: every expert of `bank` becomes expert 0 of `base` with a random k_mask_ratio of its
// weights zeroed, the survivors scaled by 1 / (1 - ratio) so each projection keeps its expected output.
void spawn_experts(const Bank& base, Bank& bank, moe::Rng& rng) {
  const auto masked_copy = [&](moe::ConstMatrixView<T> from, moe::MatrixView<T> to) {
    for (moe::Index r = 0; r < from.rows(); ++r)
      for (moe::Index c = 0; c < from.cols(); ++c)
        to.row(r)[c] = rng.uniform() < k_mask_ratio ? T(0) : from.row(r)[c] / T(1 - k_mask_ratio);
  };
  for (moe::Index e = 0; e < bank.n_experts(); ++e) {
    masked_copy(base.w1(0), bank.w1(e));
    masked_copy(base.w3(0), bank.w3(e));
    masked_copy(base.w2(0), bank.w2(e));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "evomoe [--quick] [--seed=S] [--out=DIR]");
  const Budget budget = cli.quick ? Budget{30, 120, 30} : Budget{500, 2000, 500};
  const moe::Index n_train = 16384, n_test = 4096;

  auto all = moe::examples::make_regimes(n_train + n_test, k_d_model, int(k_experts), cli.seed);
  all.target /= std::sqrt(double(k_d_model));  // unit-variance targets
  moe::examples::Regimes train{all.x.topRows(n_train), all.target.topRows(n_train), {}};
  moe::examples::Regimes test{all.x.bottomRows(n_test), all.target.bottomRows(n_test), {}};

  auto loss_csv = moe::examples::open_csv(cli, "evomoe_loss.csv");
  auto active_csv = moe::examples::open_csv(cli, "evomoe_active.csv");
  loss_csv << "model,step,loss\n";
  active_csv << "step,active_experts,tau\n";
  moe::RowMatrix<T> x(k_batch, k_d_model), target(k_batch, k_d_model);
  const auto shape = [](moe::Index n_experts, moe::Index top_k) {
    return moe::MoEConfig{.d_model = k_d_model, .d_ff = k_d_ff, .n_experts = n_experts, .top_k = top_k};
  };

  // Phase 1: one expert behind a one-expert router (its weight is always 1): a dense SwiGLU FFN.
  TopKLayer dense(moe::routers::TopKRouter<T>(shape(1, 1)), Bank(shape(1, 1)));
  dense.init(cli.seed + 1);
  moe::optim::AdamW<T> dense_adam({.lr = k_lr, .weight_decay = 0});
  moe::TrainingContext<T> ctx;
  moe::train_loop({.steps = budget.dense_steps, .seed = cli.seed + 2, .label = "evomoe dense"},
                  [&](long step, moe::Rng& rng) {
                    moe::examples::draw_batch(train, rng, x, target);
                    const double loss = moe::examples::train_step(dense, dense, dense_adam, ctx, x, target).loss;
                    loss_csv << "evomoe," << step + 1 << ',' << loss << '\n';
                    return moe::StepReport{.loss = loss, .tokens = k_batch};
                  });

  // Phase 2: spawn E experts, then the DTS gate over all of them (top_k = E: a token may use every expert).
  const moe::routers::DenseToSparseOptions dts{.threshold = 0.001,
                                               .max_temperature = 1.0,
                                               .min_temperature = 0.5,
                                               .decay = moe::routers::TemperatureDecay::exponential,
                                               .decay_steps = static_cast<std::uint64_t>(budget.soft_steps),
                                               .hard_switch_step = budget.soft_steps,
                                               .use_gumbel_gates = true,
                                               .seed = cli.seed + 3};
  DtsLayer evo(moe::routers::DenseToSparseGate<T>(shape(k_experts, k_experts), dts), Bank(shape(k_experts, k_experts)));
  evo.init(cli.seed + 4);  // the gate; the bank is overwritten next
  moe::Rng mask_rng(cli.seed + 5);
  spawn_experts(dense.bank<0>(), evo.bank<0>(), mask_rng);
  moe::optim::AdamW<T> evo_adam({.lr = k_lr, .weight_decay = 0});
  std::vector<double> soft_active;
  double hard_active = 0;
  moe::train_loop({.steps = budget.soft_steps + budget.hard_steps, .seed = cli.seed + 6, .label = "evomoe DTS gate"},
                  [&](long step, moe::Rng& rng) {
                    evo.router().set_step(static_cast<std::uint64_t>(step));
                    moe::examples::draw_batch(train, rng, x, target);
                    const auto [loss, active] = moe::examples::train_step(evo, evo, evo_adam, ctx, x, target);
                    loss_csv << "evomoe," << budget.dense_steps + step + 1 << ',' << loss << '\n';
                    active_csv << budget.dense_steps + step + 1 << ',' << active << ',' << evo.router().temperature()
                               << '\n';
                    if (evo.router().hard())
                      hard_active = std::max(hard_active, active);
                    else
                      soft_active.push_back(active);
                    return moe::StepReport{.loss = loss, .tokens = k_batch};
                  });

  // Baselines from scratch for the whole budget, each at its best learning rate: Switch top-1 with its balance
  // loss, and a dense SwiGLU FFN of the same active FLOPs.
  const auto best_of_lrs = [&](const char* name, auto make) {
    double best = 1e300;
    for (const double lr : k_baseline_lrs) {
      auto layer = make();
      layer.init(cli.seed + 4);
      noisy_router(layer).set_training(true);
      moe::optim::AdamW<T> adam({.lr = lr, .weight_decay = 0});
      const std::string label = std::string(name) + " lr " + std::to_string(lr).substr(0, 5);
      moe::train_loop({.steps = budget.total(), .seed = cli.seed + 6, .label = label}, [&](long step, moe::Rng& rng) {
        noisy_router(layer).set_step(static_cast<std::uint64_t>(step));
        moe::examples::draw_batch(train, rng, x, target);
        const double loss = moe::examples::train_step(layer, layer, adam, ctx, x, target).loss;
        if (lr == k_lr) loss_csv << name << ',' << step + 1 << ',' << loss << '\n';
        return moe::StepReport{.loss = loss, .tokens = k_batch};
      });
      const double held_out = eval_mse(layer, test);
      std::printf("%s, lr %.0e: held-out MSE %.4f\n", name, lr, held_out);
      best = std::min(best, held_out);
    }
    return best;
  };
  const double switch_loss = best_of_lrs("switch_top1", [&] {
    return SwitchLayer(moe::routers::WithLosses(moe::routers::TopKRouter<T>(
                                                    shape(k_experts, 1), moe::routers::presets::switch_transformer()),
                                                moe::losses::SwitchLoss{.coeff = 1e-2}),
                       Bank(shape(k_experts, 1)));
  });
  const double dense_loss =
      best_of_lrs("dense", [&] { return TopKLayer(moe::routers::TopKRouter<T>(shape(1, 1)), Bank(shape(1, 1))); });

  const double evo_loss = eval_mse(evo, test);
  const double start_active = soft_active.front(), rho = spearman_against_step(soft_active);
  std::printf("mean active experts per token: %.2f at the first phase-2 step, %.2f at the last soft step, %.2f "
              "(max) after the hard switch\n",
              start_active, soft_active.back(), hard_active);
  std::printf("Spearman rho (active experts against step, soft phase): %.3f\n", rho);
  std::printf("held-out MSE: EvoMoE %.4f, Switch top-1 %.4f, dense %.4f (best lr each; %ld steps each)\n", evo_loss,
              switch_loss, dense_loss, budget.total());
  std::printf("wrote %s/evomoe_active.csv and %s/evomoe_loss.csv\n", cli.out.c_str(), cli.out.c_str());
  const bool pass =
      start_active >= double(k_experts) - 1 && rho < -0.9 && evo_loss <= switch_loss && evo_loss <= dense_loss;
  moe::examples::report("evomoe", pass,
                        {{"start_active", start_active},
                         {"spearman", rho},
                         {"hard_active", hard_active},
                         {"loss", evo_loss},
                         {"switch_loss", switch_loss},
                         {"dense_loss", dense_loss}});
  return 0;
}
