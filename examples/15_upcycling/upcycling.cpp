/// \file upcycling.cpp
/// \brief Sparse upcycling as MoE-LLaVA runs it (arXiv 2401.15947; official code checked, see
/// include/moe/experts/upcycle.hpp): a trained dense SwiGLU FFN is copied into every expert of a top-2 MoE
/// with a fresh router, so the MoE starts at the dense model's loss; it is then trained in stages (router only,
/// then everything). The claim reproduced at small scale: the upcycled MoE continues from the dense loss, not
/// from scratch: with the same number of further steps it ends below both the dense model trained on and an
/// MoE of the same shape trained from scratch for those steps.
///
/// Task: the mixture-of-regimes regression of examples/common/regimes.hpp (d_model = 32, 8 regimes). Phase 1
/// trains one SwiGLU FFN (d_ff 64) as a dense layer for D steps (AdamW 3e-3). Phase 2, R + S steps for every
/// model, each at the best of three learning rates (1e-3, 3e-3, 1e-2, chosen on the held-out loss):
///   - upcycled: E = 8 copies of the dense FFN under a fresh top-2 router with renormalised weights
///     (routers::presets::mixtral()); R steps of the router alone (optim::ParameterGroup "router."), then S of all;
///   - dense continued: the dense FFN trained on from the phase-1 weights;
///   - MoE from scratch: the same MoE shape, freshly initialised.
/// Batches of 256 tokens, AdamW without weight decay, gradient norm clipped to 10; the loss is the MSE on 4096
/// held-out tokens.
/// Usage: upcycling [--quick] [--seed=S] [--out=DIR]
///   --quick  a shortened run (the ctest smoke test)
/// Writes DIR/upcycling_loss.csv (model,step,loss: training MSE per step; baselines once per learning rate).
/// Ends with
///   RESULT upcycling PASS|FAIL start_gap=.. loss=.. dense_loss=.. scratch_loss=..
/// PASS when the upcycled MoE's held-out MSE before its first step equals the dense model's within 1e-9
/// (relative; start_gap, the largest over the three runs) and after phase 2 is below both baselines'.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include <moe/moe.hpp>

#include "common/cli.hpp"
#include "common/regime_training.hpp"

namespace {

using T = double;
using Bank = moe::experts::SwiGLU<T>;
using Layer = moe::MoELayer<moe::routers::TopKRouter<T>, Bank>;

constexpr moe::Index k_d_model = 32, k_d_ff = 64, k_experts = 8, k_top_k = 2, k_batch = 256;
constexpr double k_lr = 3e-3;                   // phase 1
constexpr double k_lrs[] = {1e-3, 3e-3, 1e-2};  // phase 2: each model at its best of these

struct Budget {
  long dense_steps, router_steps, all_steps;
};

moe::MoEConfig shape(moe::Index n_experts, moe::Index top_k) {
  return {.d_model = k_d_model, .d_ff = k_d_ff, .n_experts = n_experts, .top_k = top_k};
}

// Trains `params` of `layer` for `steps` steps at `lr`, logging the batch loss as `name` from step `first`.
template <class Params>
void train(Layer& layer, Params& params, double lr, long steps, long first, const std::string& name, std::uint64_t seed,
           const moe::examples::Regimes& data, std::ofstream& csv) {
  moe::optim::AdamW<T> adam({.lr = lr, .weight_decay = 0});
  moe::TrainingContext<T> ctx;
  moe::RowMatrix<T> x(k_batch, k_d_model), target(k_batch, k_d_model);
  moe::train_loop({.steps = steps, .seed = seed, .label = name}, [&](long step, moe::Rng& rng) {
    moe::examples::draw_batch(data, rng, x, target);
    const double loss = moe::examples::train_step(layer, params, adam, ctx, x, target).loss;
    csv << name << ',' << first + step + 1 << ',' << loss << '\n';
    return moe::StepReport{.loss = loss, .tokens = k_batch};
  });
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "upcycling [--quick] [--seed=S] [--out=DIR]");
  const Budget budget = cli.quick ? Budget{40, 10, 50} : Budget{600, 100, 900};
  const long moe_steps = budget.router_steps + budget.all_steps;
  const moe::Index n_train = 16384, n_test = 4096;

  auto all = moe::examples::make_regimes(n_train + n_test, k_d_model, int(k_experts), cli.seed);
  all.target /= std::sqrt(double(k_d_model));  // unit-variance targets
  const moe::examples::Regimes train_set{all.x.topRows(n_train), all.target.topRows(n_train), {}};
  const moe::examples::Regimes test{all.x.bottomRows(n_test), all.target.bottomRows(n_test), {}};
  auto csv = moe::examples::open_csv(cli, "upcycling_loss.csv");
  csv << "model,step,loss\n";

  // Phase 1: one expert behind a one-expert router (its weight is always 1): a dense SwiGLU FFN.
  Layer dense(moe::routers::TopKRouter<T>(shape(1, 1)), Bank(shape(1, 1)));
  dense.init(cli.seed + 1);
  train(dense, dense, k_lr, budget.dense_steps, 0, "dense", cli.seed + 2, train_set, csv);
  const double dense_start = moe::examples::held_out_mse(dense, test);

  // Each model of the second phase at the best of three learning rates, trained for the same R + S steps.
  const moe::MoEConfig cfg = shape(k_experts, k_top_k);
  const auto best_of_lrs = [&](const char* name, auto run) {
    double best = 1e300;
    for (const double lr : k_lrs) {
      const double held_out = run(lr, std::string(name) + " lr " + std::to_string(lr).substr(0, 5));
      std::printf("%s, lr %.0e: held-out MSE %.4f\n", name, lr, held_out);
      best = std::min(best, held_out);
    }
    return best;
  };
  // Upcycled: every expert a copy of the dense FFN and a fresh router, so the first forward is the dense one;
  // the router alone for R steps, then everything for S.
  double start_gap = 0;
  const double loss = best_of_lrs("upcycled", [&](double lr, const std::string& label) {
    Layer layer(moe::routers::TopKRouter<T>(cfg, moe::routers::presets::mixtral()),
                moe::experts::upcycle(dense.bank<0>(), cfg));
    moe::Rng gate_rng(cli.seed + 3);
    layer.router().init(gate_rng);
    start_gap = std::max(start_gap, std::abs(moe::examples::held_out_mse(layer, test) - dense_start) / dense_start);
    moe::optim::ParameterGroup router(layer, "router.");
    train(layer, router, lr, budget.router_steps, budget.dense_steps, label, cli.seed + 4, train_set, csv);
    train(layer, layer, lr, budget.all_steps, budget.dense_steps + budget.router_steps, label, cli.seed + 5, train_set,
          csv);
    return moe::examples::held_out_mse(layer, test);
  });
  // The dense FFN trained on from the same weights, and the same MoE from scratch, for the same R + S steps.
  const double dense_loss = best_of_lrs("dense_continued", [&](double lr, const std::string& label) {
    Layer layer(moe::routers::TopKRouter<T>(shape(1, 1)), moe::experts::upcycle(dense.bank<0>(), shape(1, 1)));
    train(layer, layer, lr, moe_steps, budget.dense_steps, label, cli.seed + 6, train_set, csv);
    return moe::examples::held_out_mse(layer, test);
  });
  const double scratch_loss = best_of_lrs("moe_scratch", [&](double lr, const std::string& label) {
    Layer layer(moe::routers::TopKRouter<T>(cfg, moe::routers::presets::mixtral()), Bank(cfg));
    layer.init(cli.seed + 7);
    train(layer, layer, lr, moe_steps, budget.dense_steps, label, cli.seed + 6, train_set, csv);
    return moe::examples::held_out_mse(layer, test);
  });

  std::printf("held-out MSE: dense after phase 1 %.6f; upcycled MoE before its first step: relative gap %.1e\n",
              dense_start, start_gap);
  std::printf("after %ld more steps (best lr each): upcycled %.4f, dense continued %.4f, MoE from scratch %.4f\n",
              moe_steps, loss, dense_loss, scratch_loss);
  std::printf("wrote %s/upcycling_loss.csv\n", cli.out.c_str());
  const bool pass = start_gap <= 1e-9 && loss < dense_loss && loss < scratch_loss;
  moe::examples::report(
      "upcycling", pass,
      {{"start_gap", start_gap}, {"loss", loss}, {"dense_loss", dense_loss}, {"scratch_loss", scratch_loss}});
  return 0;
}
