// Forward pass of the Mixtral-style layer against the naive per-token reference, same shapes, same run.
// Counters: GFLOPS (active-expert FLOPs, 6 T k d ff) and tokens_per_s. Compare the two rows of a shape as a
// ratio: the machine is shared and absolute figures drift.
//
//   moe_bench --benchmark_filter='forward/mixtral'      # one shape
//   OMP_NUM_THREADS=1 moe_bench                          # single thread

#include <string>

#include <benchmark/benchmark.h>
#include <moe/moe.hpp>
#include <moe/reference/naive_moe.hpp>

#include "presets.hpp"

namespace {

using moe::Index;

moe::RowMatrix<float> tokens(Index n_tokens, Index d_model) {
  moe::Rng rng(7);
  moe::RowMatrix<float> x(n_tokens, d_model);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  return x;
}

void set_counters(benchmark::State& state, const moe::MoEConfig& cfg, Index n_tokens) {
  state.counters["GFLOPS"] = benchmark::Counter(moe::bench::active_flops(cfg, n_tokens) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(n_tokens), benchmark::Counter::kIsIterationInvariantRate);
}

void bm_forward(benchmark::State& state, moe::MoEConfig cfg, Index n_tokens) {
  moe::MixtralMoE layer(cfg);
  layer.init(1);
  const auto x = tokens(n_tokens, cfg.d_model);
  moe::RowMatrix<float> y(n_tokens, cfg.d_model);
  moe::Workspace ws(layer.workspace_bytes(n_tokens));
  for (auto _ : state) {
    layer.forward(x, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, cfg, n_tokens);
}

void bm_naive(benchmark::State& state, moe::MoEConfig cfg, Index n_tokens) {
  moe::MixtralMoE layer(cfg);
  layer.init(1);
  const auto x = tokens(n_tokens, cfg.d_model);
  for (auto _ : state) {
    auto y = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<float>(x));
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, cfg, n_tokens);
}

const bool registered = [] {
  for (const auto& p : moe::bench::k_presets) {
    for (Index t : moe::bench::k_token_counts) {
      const std::string cell = std::string(p.name) + "/T" + std::to_string(t);
      benchmark::RegisterBenchmark(("forward/" + cell).c_str(), bm_forward, p.cfg, t)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("naive/" + cell).c_str(), bm_naive, p.cfg, t)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
  return true;
}();

}  // namespace
