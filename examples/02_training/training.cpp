/// \file training.cpp
/// \brief Trains an MoE layer end to end with the library's backward pass and AdamW, on a synthetic
/// mixture of regimes (examples/common/regimes.hpp), next to one FFN of the same active FLOPs, and shows
/// the experts specialising: the share of each regime's tokens that each expert receives.
///
/// Usage: training [--quick] [--seed=S] [--out=DIR]
///   --quick   150 steps instead of 600 (the ctest smoke test)
///   --out     where to write training_loss.csv and training_expert_load.csv (default: current directory);
///             scripts/plot.py DIR turns them into PNGs
/// Prints a progress line on stderr and ends with
///   RESULT training PASS|FAIL ratio=<MoE loss / dense loss> (criterion: ratio < 0.5)

#include <cstdio>
#include <fstream>
#include <string>

#include <moe/moe.hpp>

#include "common/regimes.hpp"

namespace {

struct Options {
  int steps = 600;
  std::uint64_t seed = 1;
  std::string out = ".";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      o.steps = 150;
    } else if (a.rfind("--seed=", 0) == 0) {
      o.seed = std::stoull(a.substr(7));
    } else if (a.rfind("--out=", 0) == 0) {
      o.out = a.substr(6);
    } else {
      std::fprintf(stderr, "unknown argument %s\nusage: training [--quick] [--seed=S] [--out=DIR]\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

// One training run; appends (step, loss) rows for `name` to the loss CSV.
template <class Layer>
double train(const char* name, Layer& layer, const moe::examples::Regimes& data, int steps, std::ofstream& csv) {
  moe::optim::AdamW<double> adam({.lr = 1e-2, .weight_decay = 0});
  moe::TrainingContext<double> ctx;
  moe::RowMatrix<double> y(data.x.rows(), data.x.cols()), dx(data.x.rows(), data.x.cols()), dy;
  double loss = 0;
  moe::ProgressLine progress(name, steps);
  for (int s = 1; s <= steps; ++s) {
    layer.zero_grad();
    layer.forward(data.x, y, ctx);
    loss = moe::examples::mse(y, data.target, dy);
    layer.backward(dy, dx, ctx);
    moe::optim::clip_grad_norm(layer, 10.0);
    adam.step(layer);
    csv << name << ',' << s << ',' << loss << '\n';
    progress.update(s, {loss, 0.0, data.x.rows()});
  }
  progress.finish();
  return loss;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  const moe::Index d = 8, ff = 16, n_regimes = 4;
  const auto data = moe::examples::make_regimes(256, d, n_regimes, opt.seed);

  // Top-1 without renormalisation: the router trains through the routing weight (Switch style).
  moe::MoELayer<moe::routers::TopKSoftmax<double>, moe::experts::SwiGLU<double>> moe_layer(
      moe::routers::TopKSoftmax<double>({.d_model = d, .d_ff = ff, .n_experts = n_regimes, .top_k = 1},
                                        {.renormalize = false}),
      moe::experts::SwiGLU<double>({.d_model = d, .d_ff = ff, .n_experts = n_regimes, .top_k = 1}));
  moe::MixtralMoEType<double> dense({.d_model = d, .d_ff = ff, .n_experts = 1, .top_k = 1});
  moe_layer.init(opt.seed + 1);
  dense.init(opt.seed + 1);

  std::ofstream loss_csv(opt.out + "/training_loss.csv");
  loss_csv << "model,step,loss\n";
  const double moe_loss = train("moe", moe_layer, data, opt.steps, loss_csv);
  const double dense_loss = train("dense", dense, data, opt.steps, loss_csv);

  // Which expert serves which regime.
  moe::RoutingStats stats(moe_layer);
  moe::RowMatrix<double> y(data.x.rows(), d);
  stats.record(moe_layer.forward(data.x, y), data.regime);
  std::ofstream load_csv(opt.out + "/training_expert_load.csv");
  stats.write_csv(load_csv);
  std::printf("share of each regime's tokens per expert:\n");
  for (const auto& [regime, counts] : stats.tokens_per_group()) {
    long total = 0;
    for (long c : counts) total += c;
    std::printf("  regime %d:", regime);
    for (long c : counts) std::printf(" %5.2f", double(c) / double(total));
    std::printf("\n");
  }
  const double ratio = moe_loss / dense_loss;
  std::printf("final MSE: MoE %.4f, one FFN of the same active FLOPs %.4f\n", moe_loss, dense_loss);
  std::printf("wrote %s/training_loss.csv and %s/training_expert_load.csv\n", opt.out.c_str(), opt.out.c_str());
  std::printf("RESULT training %s ratio=%.3f moe_loss=%.4f dense_loss=%.4f\n", ratio < 0.5 ? "PASS" : "FAIL", ratio,
              moe_loss, dense_loss);
  return ratio < 0.5 ? 0 : 1;
}
