// The layer's forward pass on the issue-#6 shapes, with its baselines and the machine's limits measured in the
// same run (docs/benchmarks.md has a table and how to reproduce it).
//
// Cells, each for threads in {1, 2}:
//   forward/<S1|S2>/<f32|bf16|int8|int4>/T<n>/threads<k>  the layer (router + plan + banks + combine)
//   ideal/<S1|S2>/f32/T<n>/threads<k>                 ideal routing: each used expert's rows through Eigen GEMM
//   naive/<S1|S2>/f32/T<n>/threads1                   reference/naive_moe.hpp: per-token double loop
//   limits/<fma_f32|dot_bf16|dot_int8|dram_read>/threads<k>   the machine's peaks, measured here
//   forward_backward/<S1|S2>/f32/T<n>/threads<k>     one training step (re-pack, forward, backward)
// Every cell except the limits times single calls, each right after a cache flush (untimed), so weights come
// from DRAM as they do in a multi-layer model, and repeats that k_repetitions (7) times: the console shows the
// median (and mean, stddev, cv) of the single-call figures.
// Counters, plain numbers per call: GFLOPS (active-expert FLOPs, 6 T k d ff), tokens_per_s, weights_GBps =
// expert weight bytes touched per second (next to limits/dram_read: how bandwidth-bound a cell is),
// cold_read_GBps = reading that many bytes right after a flush, and roofline_fraction = GFLOPS /
// min(compute peak of the kernel that ran, bandwidth x FLOPs per weight byte touched), the bandwidth being the
// larger of cold_read_GBps and limits/dram_read. Compare ratios within one run: the machine is shared.
//
//   moe_bench --benchmark_filter='forward/S1/f32/T512'
//   OMP_PROC_BIND=close moe_bench --benchmark_filter='^(limits|forward)'

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>
#include <Eigen/Core>
#include <moe/moe.hpp>
#include <moe/reference/naive_moe.hpp>

#if defined(__AVX512BF16__) || defined(__AVX512VNNI__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "presets.hpp"

namespace {

using moe::Index;

template <class Storage>
using Layer = moe::MoELayer<moe::routers::TopKSoftmax<float>,
                            moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, Storage>>;

/// The 4-bit storage the bench runs: q4_0's format (groups of 32, f16 scales).
using Int4 = moe::kernels::Int4Weights<32, moe::kernels::F16Scales>;

/// Bytes one stored weight costs (the per-channel int8 scales are under 1 %; int4: a nibble plus the group's
/// f16 scale, 0.5625).
template <class Storage>
constexpr double weight_bytes() {
  if constexpr (std::is_same_v<Storage, moe::kernels::BF16Weights>) return 2.0;
  else if constexpr (std::is_same_v<Storage, moe::kernels::Int8Weights>) return 1.0;
  else if constexpr (std::is_same_v<Storage, Int4>) {
    using K = Int4::kernel<float, moe::kernels::default_arch>;  // a step: group x width weights and their scales
    return double(K::step_bytes) / double(K::group * K::width);
  } else
    return 4.0;
}

/// Runs f with `threads` OpenMP threads, restoring the previous setting.
template <class F>
void with_threads(int threads, F&& f) {
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  f();
  omp_set_num_threads(saved);
#else
  (void)threads;
  f();
#endif
}

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class F>
double best_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) t.push_back(seconds(f));
  std::sort(t.begin(), t.end());
  return t.front();
}

// ---- machine limits ------------------------------------------------------------------------------------

constexpr long k_peak_iterations = 4'000'000;

/// GFLOP/s of 12 independent FMA chains per thread on full registers.
double fma_peak(int threads) {
  using B = xsimd::batch<float, moe::kernels::default_arch>;
  float sink = 0;
  const double s = best_seconds(7, [&] {
    MOE_OMP(omp parallel num_threads(threads) reduction(+ : sink))
    {
      B acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = B(float(i));
      const B a(0.999999f), b(1e-7f);
      for (long it = 0; it < k_peak_iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = moe::kernels::detail::fmadd(acc[i], a, b);
      }
      for (int i = 0; i < 12; ++i) sink += xsimd::hadd(acc[i]);
    }
  });
  benchmark::DoNotOptimize(sink);
  return threads * double(k_peak_iterations) * 12 * 2 * B::size / s * 1e-9;
}

/// GFLOP/s of 12 independent vdpbf16ps chains per thread (64 FLOP each); without AVX512-BF16 the bf16
/// kernel widens to f32 and runs FMAs, so its peak is the FMA one.
double bf16_peak(int threads) {
#if defined(__AVX512BF16__)
  float sink = 0;
  const double s = best_seconds(7, [&] {
    MOE_OMP(omp parallel num_threads(threads) reduction(+ : sink))
    {
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3F803F80), b = (__m512bh)_mm512_set1_epi32(0x33803380);
      for (long it = 0; it < k_peak_iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      }
      alignas(64) float lanes[16];  // (16) not _mm512_reduce_add_ps: GCC 12 warns inside it (bug 105593)
      for (int i = 0; i < 12; ++i) {
        _mm512_store_ps(lanes, acc[i]);
        for (float v : lanes) sink += v;
      }
    }
  });
  benchmark::DoNotOptimize(sink);
  return threads * double(k_peak_iterations) * 12 * 64 / s * 1e-9;
#else
  return fma_peak(threads);
#endif
}

/// GOP/s of 12 independent vpdpbusd chains per thread (128 OP each); on AVX2 without VNNI, of the AVX2
/// kernel's step through the multiplies (vpsignb, vpmaddubsw, vpmaddwd: 32 byte products and their sums,
/// 64 OP); 0 elsewhere (no compute peak: the roofline is the bandwidth one).
double int8_peak(int threads) {
#if defined(__AVX512VNNI__)
  long long sink = 0;
  const double s = best_seconds(7, [&] {
    MOE_OMP(omp parallel num_threads(threads) reduction(+ : sink))
    {
      __m512i acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
      const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
      for (long it = 0; it < k_peak_iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
      }
      alignas(64) std::int32_t lanes[16];  // (16)
      for (int i = 0; i < 12; ++i) {
        _mm512_store_si512(lanes, acc[i]);
        for (std::int32_t v : lanes) sink += v;
      }
    }
  });
  benchmark::DoNotOptimize(sink);
  return threads * double(k_peak_iterations) * 12 * 128 / s * 1e-9;
#elif defined(__AVX2__)
  long long sink = 0;
  const double s = best_seconds(7, [&] {
    MOE_OMP(omp parallel num_threads(threads) reduction(+ : sink))
    {
      __m256i acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
      const __m256i a = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
      for (long it = 0; it < k_peak_iterations; ++it) {  // the chain runs through the multiplies
        for (int i = 0; i < 12; ++i) acc[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(acc[i], a)), ones);
      }
      alignas(32) std::int32_t lanes[8];  // (8)
      for (int i = 0; i < 12; ++i) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i]);
        for (std::int32_t v : lanes) sink += v;
      }
    }
  });
  benchmark::DoNotOptimize(sink);
  return threads * double(k_peak_iterations) * 12 * 64 / s * 1e-9;
#else
  (void)threads;
  return 0;
#endif
}

/// A 1 GiB buffer, first touched by the threads that read it.
const std::vector<float>& big_buffer() {
  static const auto buf = [] {
    std::vector<float> b(std::size_t{1} << 28);
    MOE_OMP(omp parallel for schedule(static))
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = 1.0f;
    return b;
  }();
  return buf;
}

/// One parallel read-only sum over the first n floats of the 1 GiB buffer, four independent vector
/// accumulators per thread (a scalar reduction per block would make the add chain, not DRAM, the limit).
float read_floats(Index n, int threads) {
  using B = xsimd::batch<float, moe::kernels::default_arch>;
  const float* data = big_buffer().data();
  const Index blocks = n / (4 * Index(B::size));
  float sink = 0;
  MOE_OMP(omp parallel num_threads(threads) reduction(+ : sink))
  {
    B acc[4] = {B(0.0f), B(0.0f), B(0.0f), B(0.0f)};
    MOE_OMP(omp for schedule(static))
    for (Index i = 0; i < blocks; ++i) {
      const float* p = data + i * 4 * Index(B::size);
      for (int j = 0; j < 4; ++j) acc[j] += B::load_unaligned(p + j * Index(B::size));
    }
    sink += xsimd::hadd((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  return sink;
}

/// GB/s of reading the whole 1 GiB buffer, best of 7.
double dram_read(int threads) {
  const Index n = static_cast<Index>(big_buffer().size());
  float sink = 0;
  const double s = best_seconds(7, [&] { sink += read_floats(n, threads); });
  benchmark::DoNotOptimize(sink);
  return double(n) * sizeof(float) / s * 1e-9;
}

struct Limits {
  double fma_gflops, bf16_gflops, int8_gops, dram_gbs;
};

/// The limits at a thread count, measured once per process: best of 7 (noise on a shared host only lowers them).
const Limits& limits(int threads) {
  static std::map<int, Limits> memo;
  auto it = memo.find(threads);
  if (it == memo.end()) {
    it = memo.emplace(threads, Limits{fma_peak(threads), bf16_peak(threads), int8_peak(threads), dram_read(threads)}).first;
  }
  return it->second;
}

void bm_limit(benchmark::State& state, int which, int threads) {
  const Limits& l = limits(threads);
  for (auto _ : state) benchmark::DoNotOptimize(l);
  const double v[] = {l.fma_gflops, l.bf16_gflops, l.int8_gops, l.dram_gbs};
  state.counters[which == 3 ? "GBps" : "GFLOPS"] = v[which];
}

// ---- cache flush for decode cells ----------------------------------------------------------------------

/// Reads 256 MiB (8x the 32 MiB last-level cache) so the next timed call finds cold weights. Reading, not
/// writing: dirty lines left in the cache would be written back during the timed call and steal bandwidth.
void flush_caches() {
  static const std::vector<float> junk(std::size_t{1} << 26, 1.0f);
  float sink = 0;
  MOE_OMP(omp parallel for schedule(static) reduction(+ : sink))
  for (std::size_t i = 0; i < junk.size(); i += 16) sink += junk[i];
  benchmark::DoNotOptimize(sink);
}

/// Runs f once per benchmark iteration right after a cache flush, timing f alone (cells use manual time);
/// returns the seconds per call over the iterations.
template <class F>
double run_cold(benchmark::State& state, F&& f) {
  double total = 0;
  for (auto _ : state) {
    flush_caches();
    const double s = seconds(f);
    state.SetIterationTime(s);
    total += s;
  }
  return total / static_cast<double>(state.iterations());
}

/// GB/s of reading `bytes` right after a cache flush, best of 7: what DRAM gives a decode call of that size at
/// this moment. The host's 2-thread bandwidth drifts (33-72 GB/s between runs here), so decode cells take
/// their roofline from the larger of this and limits/dram_read.
double cold_read(double bytes, int threads) {
  const Index n = std::min(static_cast<Index>(bytes / sizeof(float)), static_cast<Index>(big_buffer().size()));
  float sink = 0;
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    flush_caches();
    t.push_back(seconds([&] { sink += read_floats(n, threads); }));
  }
  benchmark::DoNotOptimize(sink);
  return double(n) * sizeof(float) / *std::min_element(t.begin(), t.end()) * 1e-9;
}

// ---- the layer -----------------------------------------------------------------------------------------

moe::RowMatrix<float> tokens(Index n_tokens, Index d_model) {
  moe::Rng rng(7);
  moe::RowMatrix<float> x(n_tokens, d_model);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  return x;
}

/// One initialised layer per (storage, shape), shared by that storage's cells (weights take seconds to build).
template <class Storage>
Layer<Storage>& layer_for(const moe::bench::Preset& p) {
  static std::map<std::string, std::unique_ptr<Layer<Storage>>> cache;
  auto& slot = cache[p.name];
  if (!slot) {
    slot = std::make_unique<Layer<Storage>>(p.cfg);
    slot->init(1);
  }
  return *slot;
}

/// GFLOPS (flop_factor x the active-expert FLOPs) and tokens_per_s of calls of `per_call` seconds.
void set_counters(benchmark::State& state, const moe::MoEConfig& cfg, Index n_tokens, double per_call,
                  double flop_factor = 1.0) {
  state.counters["GFLOPS"] = flop_factor * moe::bench::active_flops(cfg, n_tokens) * 1e-9 / per_call;
  state.counters["tokens_per_s"] = static_cast<double>(n_tokens) / per_call;
}

/// GFLOP/s the machine allows for this cell: min(compute peak, bandwidth x FLOPs per weight byte touched);
/// the bandwidth bound alone where no compute peak was measured (peak 0: int8 on the scalar loop).
double roofline_gflops(double peak, double gbs, const moe::MoEConfig& cfg, Index n_tokens, Index experts_hit,
                       double bytes_per_weight) {
  const double bytes = double(experts_hit) * 3.0 * double(cfg.d_model) * double(cfg.d_ff) * bytes_per_weight;
  const double memory = gbs * moe::bench::active_flops(cfg, n_tokens) / bytes;
  return peak > 0 ? std::min(peak, memory) : memory;
}

/// The "model name" line of /proc/cpuinfo, or "unknown".
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

template <class Storage>
void bm_forward(benchmark::State& state, moe::bench::Preset p, Index n_tokens, int threads) {
  const auto& layer = layer_for<Storage>(p);
  const auto x = tokens(n_tokens, p.cfg.d_model);
  moe::RowMatrix<float> y(n_tokens, p.cfg.d_model);
  moe::Workspace ws(layer.workspace_bytes(n_tokens));
  Index hit = 0;
  double per_call = 0;
  with_threads(threads, [&] {
    const auto r = layer.forward(x, y, ws);  // warm-up: packs the weights, starts the thread team
    hit = std::count_if(r.tokens_per_expert.begin(), r.tokens_per_expert.end(), [](Index c) { return c > 0; });
    per_call = run_cold(state, [&] {
      layer.forward(x, y, ws);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    });
  });
  set_counters(state, p.cfg, n_tokens, per_call);
  const Limits& l = limits(threads);
  const double peak = std::is_same_v<Storage, moe::kernels::BF16Weights> ? l.bf16_gflops
                      : std::is_same_v<Storage, moe::kernels::Int8Weights> || std::is_same_v<Storage, Int4>
                          ? l.int8_gops
                          : l.fma_gflops;
  // Expert weight bytes the call streams (each touched expert's three matrices, read once).
  const double bytes = double(hit) * 3.0 * double(p.cfg.d_model) * double(p.cfg.d_ff) * weight_bytes<Storage>();
  state.counters["weights_GBps"] = bytes * 1e-9 / per_call;
  const double cold = cold_read(bytes, threads);
  state.counters["cold_read_GBps"] = cold;
  const double bound = roofline_gflops(peak, std::max(l.dram_gbs, cold), p.cfg, n_tokens, hit, weight_bytes<Storage>());
  state.counters["roofline_fraction"] = moe::bench::active_flops(p.cfg, n_tokens) * 1e-9 / per_call / bound;
}

/// Ideal routing: the routed rows of each used expert, already grouped, through Eigen GEMM on the same
/// weights; no router, gather or combine.
void bm_ideal(benchmark::State& state, moe::bench::Preset p, Index n_tokens, int threads) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat>;
  const auto& layer = layer_for<moe::kernels::NativeWeights>(p);
  const auto& bank = layer.bank<0>();
  const Index d = p.cfg.d_model, ff = p.cfg.d_ff;
  const auto x = tokens(n_tokens, d);
  moe::RowMatrix<float> y(n_tokens, d);
  moe::Workspace ws(layer.workspace_bytes(n_tokens));
  const auto r = layer.forward(x, y, ws);
  std::vector<Mat> xs, h1, h3, ys;  // per used expert: (n_e, d), (n_e, ff), (n_e, ff), (n_e, d)
  std::vector<Index> used;
  for (Index e = 0; e < p.cfg.n_experts; ++e) {
    const Index n = r.tokens_per_expert[static_cast<std::size_t>(e)];
    if (n == 0) continue;
    used.push_back(e);
    xs.push_back(x.topRows(n));  // any n rows: the FLOPs and weight bytes are what matter
    h1.emplace_back(n, ff);
    h3.emplace_back(n, ff);
    ys.emplace_back(n, d);
  }
  double per_call = 0;
  with_threads(threads, [&] {
    per_call = run_cold(state, [&] {
      for (std::size_t i = 0; i < used.size(); ++i) {
        const Index e = used[i];
        h1[i].noalias() = xs[i] * CMap(bank.w1(e).data(), ff, d).transpose();
        h3[i].noalias() = xs[i] * CMap(bank.w3(e).data(), ff, d).transpose();
        h1[i] = (h1[i].array() / (1.0f + (-h1[i].array()).exp()) * h3[i].array()).matrix();
        ys[i].noalias() = h1[i] * CMap(bank.w2(e).data(), d, ff).transpose();
      }
      benchmark::ClobberMemory();
    });
  });
  set_counters(state, p.cfg, n_tokens, per_call);
}

void bm_naive(benchmark::State& state, moe::bench::Preset p, Index n_tokens) {
  const auto& layer = layer_for<moe::kernels::NativeWeights>(p);
  const auto x = tokens(n_tokens, p.cfg.d_model);
  const double per_call = run_cold(state, [&] {
    auto y = moe::reference::naive_moe_forward(layer, moe::ConstMatrixView<float>(x));
    benchmark::DoNotOptimize(y.data());
  });
  set_counters(state, p.cfg, n_tokens, per_call);
}

/// One training step's compute: training forward (re-packing the panels, as after every optimizer step), then
/// backward (weight gradients accumulate). GFLOPS counts
/// the usual 3x the forward's active FLOPs (forward, input gradient, weight gradient); the FFN backward also
/// recomputes gate and up, which is not counted. The T = 512 cells are the training benchmark.
void bm_forward_backward(benchmark::State& state, moe::bench::Preset p, Index n_tokens, int threads) {
  auto& layer = layer_for<moe::kernels::NativeWeights>(p);
  const auto x = tokens(n_tokens, p.cfg.d_model);
  moe::RowMatrix<float> y(n_tokens, p.cfg.d_model), dx(n_tokens, p.cfg.d_model);
  const moe::RowMatrix<float> dy = tokens(n_tokens, p.cfg.d_model) * 1e-3f;
  moe::TrainingContext<float> ctx;
  double per_call = 0;
  with_threads(threads, [&] {
    layer.forward(x, y, ctx);  // warm-up: sizes the context, allocates the gradients
    layer.backward(dy, dx, ctx);
    per_call = run_cold(state, [&] {
      layer.bank<0>().repack_on_next_forward();  // an optimizer step changed the weights: the forward re-packs
      layer.forward(x, y, ctx);
      layer.backward(dy, dx, ctx);
      benchmark::DoNotOptimize(dx.data());
      benchmark::ClobberMemory();
    });
  });
  set_counters(state, p.cfg, n_tokens, per_call, 3.0);
}

/// Repetitions of every cell: the reported figure is the median of this many single calls.
constexpr int k_repetitions = 7;

/// A cell timed as k_repetitions single calls, each after a flush (run_cold), milliseconds.
void single_calls(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(1)->Repetitions(k_repetitions)->DisplayAggregatesOnly();
}

template <class Storage>
void register_forward(const moe::bench::Preset& p, const char* dtype) {
  for (Index t : moe::bench::k_token_counts) {
    for (int threads : {1, 2}) {
      const std::string name = std::string("forward/") + p.name + "/" + dtype + "/T" + std::to_string(t) +
                               "/threads" + std::to_string(threads);
      single_calls(benchmark::RegisterBenchmark(name.c_str(), bm_forward<Storage>, p, t, threads));
    }
  }
}

const bool registered = [] {
  // What the figures depend on, printed in the context block (and in --benchmark_out's JSON).
  benchmark::AddCustomContext("moe_isa", moe::kernels::default_arch::name());
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("cores", std::to_string(std::thread::hardware_concurrency()));
  const char* limit_names[] = {"fma_f32", "dot_bf16", "dot_int8", "dram_read"};
  for (int threads : {1, 2}) {
    for (int which = 0; which < 4; ++which) {
      benchmark::RegisterBenchmark(
          (std::string("limits/") + limit_names[which] + "/threads" + std::to_string(threads)).c_str(), bm_limit,
          which, threads)
          ->Iterations(1);
    }
  }
  for (const auto& p : moe::bench::k_presets) {
    register_forward<moe::kernels::NativeWeights>(p, "f32");
    register_forward<moe::kernels::BF16Weights>(p, "bf16");
    register_forward<moe::kernels::Int8Weights>(p, "int8");
    register_forward<Int4>(p, "int4");
    for (Index t : moe::bench::k_token_counts) {
      const std::string cell = std::string(p.name) + "/f32/T" + std::to_string(t);
      for (int threads : {1, 2}) {
        single_calls(benchmark::RegisterBenchmark(("ideal/" + cell + "/threads" + std::to_string(threads)).c_str(),
                                                  bm_ideal, p, t, threads));
      }
      for (int threads : {1, 2}) {
        single_calls(
            benchmark::RegisterBenchmark(("forward_backward/" + cell + "/threads" + std::to_string(threads)).c_str(),
                                         bm_forward_backward, p, t, threads));
      }
      single_calls(benchmark::RegisterBenchmark(("naive/" + cell + "/threads1").c_str(), bm_naive, p, t));
    }
  }
  return true;
}();

}  // namespace
