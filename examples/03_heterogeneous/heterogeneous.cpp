/// \file heterogeneous.cpp
/// \brief One MoE layer whose experts are of six kinds: SwiGLU FFN experts, LoRA experts on a shared frozen
/// base (LLaVA-MoLE), GRU-cell experts (Hecto), and MoE++'s constant, copy and zero experts. One router
/// routes over all of them (expert ids are contiguous per bank, in the order of the template arguments);
/// the example trains the layer briefly on a mixture of regimes and prints the share of routed slots each
/// bank receives, before and after, and checks that the forward is finite and deterministic.
///
/// Usage: heterogeneous [--quick] [--seed=S]
/// The tokens form 16 sequences of 16 (a packed batch): the GRU experts carry their state along each
/// sequence (MoELayer::forward's sequence_starts).

#include <cstdio>
#include <string>
#include <vector>

#include <moe/moe.hpp>

#include "common/regimes.hpp"

namespace {

using T = double;
using Layer = moe::MoELayer<moe::routers::TopKSoftmax<T>, moe::experts::SwiGLU<T>, moe::experts::LoRASwiGLU<T>,
                            moe::experts::GRU<T>, moe::experts::ConstantExperts<T>, moe::experts::CopyExperts<T>,
                            moe::experts::ZeroExperts<T>>;
const char* const k_bank_names[] = {"ffn", "lora", "gru", "constant", "copy", "zero"};
const moe::Index k_bank_sizes[] = {4, 4, 2, 2, 1, 1};  // 14 experts

// Share of routed slots per bank, from the per-expert counts.
std::vector<double> bank_shares(const moe::RoutingStats& stats) {
  std::vector<double> shares;
  long total = 0;
  for (long c : stats.tokens_per_expert()) total += c;
  moe::Index first = 0;
  for (moe::Index n : k_bank_sizes) {
    long sum = 0;
    for (moe::Index e = first; e < first + n; ++e) sum += stats.tokens_per_expert()[static_cast<std::size_t>(e)];
    shares.push_back(total == 0 ? 0.0 : double(sum) / double(total));
    first += n;
  }
  return shares;
}

void print_shares(const char* when, const std::vector<double>& shares) {
  std::printf("%-7s", when);
  for (std::size_t b = 0; b < shares.size(); ++b) std::printf("  %s %5.1f%%", k_bank_names[b], 100 * shares[b]);
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 300;
  std::uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      steps = 60;
    } else if (a.rfind("--seed=", 0) == 0) {
      seed = std::stoull(a.substr(7));
    } else {
      std::fprintf(stderr, "unknown argument %s\nusage: heterogeneous [--quick] [--seed=S]\n", a.c_str());
      return 2;
    }
  }
  const moe::Index d = 16, ff = 32;
  const auto shape = [&](moe::Index n) { return moe::MoEConfig{.d_model = d, .d_ff = ff, .n_experts = n, .top_k = 1}; };
  Layer layer(
      moe::routers::TopKSoftmax<T>({.d_model = d, .d_ff = ff, .n_experts = 14, .top_k = 2}, {.renormalize = false}),
      moe::experts::SwiGLU<T>(shape(4)), moe::experts::LoRASwiGLU<T>(shape(4), {.rank = 4, .alpha = 8}),
      moe::experts::GRU<T>(shape(2)), moe::experts::ConstantExperts<T>(2, d), moe::experts::CopyExperts<T>(1, d),
      moe::experts::ZeroExperts<T>(1, d));
  layer.init(seed);
  const auto data = moe::examples::make_regimes(256, d, 4, seed + 1);
  std::printf("MoE layer over %td experts in 6 banks (ffn 4, lora 4, gru 2, constant 2, copy 1, zero 1), top-2\n",
              layer.n_experts());

  std::vector<moe::Index> starts;  // 16 sequences of 16 tokens
  for (moe::Index t = 0; t < data.x.rows(); t += 16) starts.push_back(t);
  moe::Workspace ws;
  moe::RoutingStats stats(layer);
  moe::RowMatrix<T> y(data.x.rows(), d), again(data.x.rows(), d), dx(data.x.rows(), d), dy;
  stats.record(layer.forward(data.x, y, ws, starts));
  print_shares("before", bank_shares(stats));

  moe::optim::AdamW<T> adam({.lr = 3e-3, .weight_decay = 0});
  moe::TrainingContext<T> ctx;
  double first_loss = 0, loss = 0;
  for (int s = 1; s <= steps; ++s) {
    layer.zero_grad();
    layer.forward(data.x, y, ctx, starts);
    loss = moe::examples::mse(y, data.target, dy);
    if (s == 1) first_loss = loss;
    layer.backward(dy, dx, ctx);
    adam.step(layer);
    if (s % 20 == 0 || s == steps) std::fprintf(stderr, "\rstep %4d/%d  loss %.4f   ", s, steps, loss);
  }
  std::fprintf(stderr, "\n");

  stats.reset();
  stats.record(layer.forward(data.x, y, ws, starts));
  print_shares("after", bank_shares(stats));
  layer.forward(data.x, again, ws, starts);
  const bool ok = y.allFinite() && y == again && loss < first_loss;
  std::printf("loss %.4f -> %.4f; mean real (non-zero-computation) experts per token %.2f\n", first_loss, loss,
              stats.mean_real_experts_per_token());
  std::printf("RESULT heterogeneous %s loss_ratio=%.3f\n", ok ? "PASS" : "FAIL", loss / first_loss);
  return ok ? 0 : 1;
}
