/// \file aux_free_bias.cpp
/// \brief Reproduces auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3, arXiv
/// 2412.19437; PAPERS.md D.6): a selection-only bias per expert, moved by γ · sign(mean load - load) after each
/// step, balances the experts as well as or better than a load-balancing loss, without the loss's gradient
/// interfering with the task (lower task loss).
///
/// Setup: the domain data of PAPERS.md D (examples/common/domains.hpp), skewed: domain 0 supplies half of the
/// sequences, domains 1-3 a sixth each; batches of 16 sequences of 32 tokens (512 tokens), d_model 16, targets
/// scaled to std ≈ 0.16. One MoE layer, 8 SwiGLU experts (d_ff 32), top-2 of sigmoid scores renormalised over
/// the chosen two (DeepSeek-V3), trained with AdamW (lr 3e-3, cosine decay to 0) on the MSE, four arms from the
/// same initialisation and the same batches:
///   aux_1e-2, aux_1e-3  losses::SwitchLoss with α = 1e-2 and 1e-3 (the sigmoid scores normalised to sum to 1
///                       are its probabilities);
///   bias_1e-3           TopKOptions::selection_bias, update_bias(this step's tokens per expert, γ = 1e-3)
///                       after every optimizer step, no balance loss;
///   none                neither.
/// Metrics: MaxVio = max_i load_i / mean load - 1 of each training batch (per step), and on 4096 held-out tokens
/// of the same skewed mixture at the end (MaxVio_global); the held-out task loss (MSE).
///
/// Criterion (PAPERS.md D.6, fixed before running): the bias arm's final MaxVio <= the aux_1e-3 arm's, its task
/// loss <= the aux_1e-2 arm's, and the none arm has the largest final MaxVio. Run with --seed=1, 2, 3.
///
/// Usage: aux_free_bias [--quick] [--seed=S] [--out=DIR]
///   --quick  200 steps instead of 2000 (the ctest smoke test)
/// Writes to DIR: aux_free_bias_max_violation.csv (model,step,max_violation per training batch),
/// aux_free_bias_loss.csv (model,step,loss: training MSE) and aux_free_bias_expert_load_<arm>.csv (RoutingStats
/// of the held-out tokens, one group per domain); scripts/plot.py DIR plots them. Prints a table of the final
/// metrics, progress on stderr, and ends with
///   RESULT aux_free_bias PASS|FAIL max_vio_bias=... max_vio_aux_1e-3=... max_vio_none=... loss_bias=... ...

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <moe/moe.hpp>

#include "common/cli.hpp"
#include "common/domains.hpp"
#include "common/loss.hpp"

namespace {

using T = double;
// Every arm has the same type: the bias and none arms carry a Switch loss of coefficient 0.
using Router = moe::routers::WithLosses<moe::routers::TopKRouter<T>, moe::losses::SwitchLoss>;
using Layer = moe::MoELayer<Router, moe::experts::SwiGLU<T>>;

constexpr moe::Index k_d = 16, k_ff = 32, k_experts = 8, k_top_k = 2;
constexpr moe::Index k_length = 32, k_sequences = 16;  // a batch: 16 sequences of 32 tokens
constexpr moe::Index k_eval_sequences = 128;
// As examples/08_global_batch_balance (targets of std ≈ 0.16, where a 1e-2 balance loss is felt by the task),
// skewed: domain 0 draws half of the sequences.
const moe::examples::DomainOptions k_data{.n_domains = 4,
                                          .d_model = k_d,
                                          .hidden = 32,
                                          .mean_norm = 4.0,
                                          .target_scale = 0.25,
                                          .domain_weights = {3, 1, 1, 1}};
constexpr double k_gamma = 1e-3;                            // bias update speed

const moe::MoEConfig k_shape{.d_model = k_d, .d_ff = k_ff, .n_experts = k_experts, .top_k = k_top_k};

struct Arm {
  const char* name;
  double alpha;  // Switch loss coefficient
  bool bias;     // aux-loss-free bias
};
constexpr Arm k_arms[] = {{"aux_1e-2", 1e-2, false}, {"aux_1e-3", 1e-3, false}, {"bias_1e-3", 0, true}, {"none", 0, false}};

struct Outcome {
  double max_violation = 0;       // held-out, at the end
  double late_max_violation = 0;  // mean over the training batches of the last 10% of steps
  double loss = 0;                // held-out MSE
};

double max_violation(std::span<const moe::Index> load) {
  double total = 0;
  for (moe::Index c : load) total += double(c);
  return double(*std::max_element(load.begin(), load.end())) / (total / double(load.size())) - 1;
}

// AdamW's learning rate at `step`: cosine decay from 3e-3 to 0, so that the routing settles before the end.
double lr(long step, long steps) { return 1.5e-3 * (1 + std::cos(3.141592653589793 * double(step) / double(steps))); }

Outcome run(const Arm& arm, const moe::examples::DomainGenerator<T>& data,
            const moe::examples::DomainBatch<T>& held_out, long steps, std::uint64_t seed, std::ofstream& vio_csv,
            std::ofstream& loss_csv, const moe::examples::Cli& cli) {
  Layer layer(Router(moe::routers::TopKRouter<T>(
                         k_shape, {.score = moe::routers::ScoreFunction::sigmoid, .selection_bias = arm.bias}),
                     moe::losses::SwitchLoss{.coeff = arm.alpha}),
              moe::experts::SwiGLU<T>(k_shape));
  layer.init(seed + 1);
  moe::optim::AdamW<T> adam({.lr = 3e-3, .weight_decay = 0});
  moe::TrainingContext<T> ctx;
  moe::RowMatrix<T> y(k_sequences * k_length, k_d), dx(k_sequences * k_length, k_d), dy;
  std::vector<moe::Index> load(static_cast<std::size_t>(k_experts));
  const long late = steps - steps / 10;
  Outcome out;
  moe::train_loop({.steps = steps, .seed = seed + 2, .label = arm.name}, [&](long step, moe::Rng& rng) {
    const auto batch = data.sample(k_sequences, k_length, rng);
    adam.set_lr(lr(step, steps));
    layer.zero_grad();
    const auto res = layer.forward(batch.x, y, ctx);
    std::copy(res.tokens_per_expert.begin(), res.tokens_per_expert.end(), load.begin());
    const double aux = res.aux_loss;
    const double loss = moe::examples::mse(y, batch.target, dy);
    layer.backward(dy, dx, ctx);
    adam.step(layer);
    if (arm.bias) layer.router().inner().update_bias(load, k_gamma);
    const double vio = max_violation(load);
    if (step >= late) out.late_max_violation += vio / double(steps - late);
    vio_csv << arm.name << ',' << step + 1 << ',' << vio << '\n';
    loss_csv << arm.name << ',' << step + 1 << ',' << loss << '\n';
    return moe::StepReport{.loss = loss, .aux_loss = aux, .tokens = batch.x.rows()};
  });

  moe::RoutingStats stats(layer);
  moe::Workspace ws;
  moe::RowMatrix<T> y_eval(held_out.x.rows(), k_d);
  stats.record(layer.forward(held_out.x, y_eval, ws), held_out.domain);
  out.max_violation = stats.max_violation();
  out.loss = moe::examples::mse(y_eval, held_out.target, dy);
  auto csv = moe::examples::open_csv(cli, std::string("aux_free_bias_expert_load_") + arm.name + ".csv");
  stats.write_csv(csv);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const auto cli = moe::examples::parse_cli(argc, argv, "aux_free_bias [--quick] [--seed=S] [--out=DIR]");
  const long steps = cli.quick ? 200 : 2000;
  const moe::examples::DomainGenerator<T> data(k_data, cli.seed);
  moe::Rng eval_rng(cli.seed + 1000);
  const auto held_out = data.sample(k_eval_sequences, k_length, eval_rng);
  std::printf("aux_free_bias: %d domains (domain 0: half of the sequences), %td experts, top-%td of sigmoid scores; "
              "%ld steps of %td tokens, seed %llu\n",
              k_data.n_domains, k_experts, k_top_k, steps, k_sequences * k_length,
              static_cast<unsigned long long>(cli.seed));
  auto vio_csv = moe::examples::open_csv(cli, "aux_free_bias_max_violation.csv");
  auto loss_csv = moe::examples::open_csv(cli, "aux_free_bias_loss.csv");
  vio_csv << "model,step,max_violation\n";
  loss_csv << "model,step,loss\n";

  std::vector<Outcome> out;
  for (const Arm& arm : k_arms) out.push_back(run(arm, data, held_out, steps, cli.seed, vio_csv, loss_csv, cli));

  std::printf("\n%-10s %22s %26s %18s\n", "arm", "MaxVio (held-out)", "MaxVio (last 10% batches)", "task loss (MSE)");
  for (std::size_t a = 0; a < out.size(); ++a)
    std::printf("%-10s %22.3f %26.3f %18.5f\n", k_arms[a].name, out[a].max_violation, out[a].late_max_violation,
                out[a].loss);
  const Outcome &aux2 = out[0], &aux3 = out[1], &bias = out[2], &none = out[3];
  const bool vio_ok = bias.max_violation <= aux3.max_violation;
  const bool loss_ok = bias.loss <= aux2.loss;
  const bool none_ok = none.max_violation > std::max({aux2.max_violation, aux3.max_violation, bias.max_violation});
  std::printf("\ncriterion: MaxVio(bias) <= MaxVio(aux_1e-3): %s; loss(bias) <= loss(aux_1e-2): %s; "
              "none has the largest MaxVio: %s\n",
              vio_ok ? "yes" : "NO", loss_ok ? "yes" : "NO", none_ok ? "yes" : "NO");
  std::printf("wrote aux_free_bias_{max_violation,loss}.csv and aux_free_bias_expert_load_<arm>.csv to %s\n",
              cli.out.c_str());
  moe::examples::report("aux_free_bias", vio_ok && loss_ok && none_ok,
                        {{"max_vio_aux_1e-2", aux2.max_violation},
                         {"max_vio_aux_1e-3", aux3.max_violation},
                         {"max_vio_bias", bias.max_violation},
                         {"max_vio_none", none.max_violation},
                         {"loss_aux_1e-2", aux2.loss},
                         {"loss_aux_1e-3", aux3.loss},
                         {"loss_bias", bias.loss},
                         {"loss_none", none.loss}});
  return 0;
}
