// RELIABILITY.md T1 and T2: several std::threads use the library at once, each with its own OpenMP team
// inside the layer. scripts/test.sh runs this file (ctest label `concurrency`) in every stage and alone under
// ThreadSanitizer (Z2).
//
// T1: one shared const layer, each thread with its own input, output and Workspace; the layer starts cold,
// so the first calls also race to pack the experts' panels. Every result is bitwise equal to the serial one.
// T2: a layer keeps its parameters' gradients (Parameter::grad(), accumulated by backward), so concurrent
// backward on ONE layer is not supported. Training forwards are const and may run at once, each with its own
// TrainingContext; their backwards then run one after another, in a fixed order (the reduction, bitwise equal
// to the serial schedule). Concurrent backward runs on per-thread layers (a data-parallel replica each).
//
// Every reference is computed on one OpenMP thread and every concurrent call runs on k_omp_threads, so
// bitwise equality also covers RELIABILITY.md D2 under TSan.

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using moe::Index;
using moe::MoEConfig;
using moe::RowMatrix;

namespace {

constexpr int k_omp_threads = 2;  // each std::thread's team inside the layer

void set_omp_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);  // per thread: a new std::thread starts from the process default
#else
  (void)n;
#endif
}

int omp_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The size of the team an OpenMP region forms when opened from a fresh std::thread (1 without OpenMP).
int team_size_in_std_thread() {
  int size = 0;
  std::thread([&] {
    set_omp_threads(k_omp_threads);
#if defined(_OPENMP)
#pragma omp parallel
    {
#pragma omp single
      size = omp_get_num_threads();
    }
#else
    size = 1;
#endif
  }).join();
  return size;
}

bool same_bits(const RowMatrix<float>& a, const RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

// Starts n threads that wait for each other before f(i), so their first calls overlap.
template <class F>
void run_together(int n, F f) {
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      set_omp_threads(k_omp_threads);
      ready.fetch_add(1);
      while (ready.load() < n) std::this_thread::yield();
      f(i);
    });
  for (auto& t : threads) t.join();
}

// Scoped OpenMP thread count of the calling thread.
class OmpThreads {
 public:
  explicit OmpThreads(int n) : saved_(omp_threads()) { set_omp_threads(n); }
  ~OmpThreads() { set_omp_threads(saved_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int saved_;
};

// Token counts: 1 and 3 stay on the calling thread, the others open parallel regions (router, experts,
// combine) once d_model and d_ff are 64: see sizes_reach_parallel_regions.
constexpr Index k_sizes[] = {1, 3, 17, 40, 130, 520};
constexpr Index k_d_model = 64;
constexpr Index k_d_ff = 64;

Index size_of(int thread, int which) {
  constexpr int n = static_cast<int>(std::size(k_sizes));
  return k_sizes[(thread + which * 3) % n];
}

RowMatrix<float> tokens(Index n, std::uint64_t seed) {
  moe::test::Rng rng(seed);
  return moe::test::normal_matrix<float>(rng, n, k_d_model);
}

// T1 on the layer make() builds (two identical cold layers: one shared by the threads, one for the serial
// reference). Thread i alternates two inputs of its own sizes for `calls` calls.
template <class Make>
void forwards_match_serial(Make make, int n_threads, int calls) {
  const auto shared = make();
  auto twin = make();
  std::vector<std::array<RowMatrix<float>, 2>> xs(static_cast<std::size_t>(n_threads)), expected(xs.size());
  {
    OmpThreads serial(1);
    moe::Workspace ws;
    for (int i = 0; i < n_threads; ++i)
      for (int which = 0; which < 2; ++which) {
        auto& x = xs[static_cast<std::size_t>(i)][static_cast<std::size_t>(which)];
        auto& y = expected[static_cast<std::size_t>(i)][static_cast<std::size_t>(which)];
        x = tokens(size_of(i, which), 1000 + static_cast<std::uint64_t>(2 * i + which));
        y.resize(x.rows(), k_d_model);
        std::as_const(twin).forward(x, y, ws);
      }
  }
  std::vector<int> mismatches(xs.size(), 0), errors(xs.size(), 0);
  run_together(n_threads, [&](int i) {
    const auto t = static_cast<std::size_t>(i);
    moe::Workspace ws;
    std::array<RowMatrix<float>, 2> ys = {RowMatrix<float>(xs[t][0].rows(), k_d_model),
                                          RowMatrix<float>(xs[t][1].rows(), k_d_model)};
    for (int call = 0; call < calls; ++call) {
      const auto which = static_cast<std::size_t>(call % 2);
      try {
        shared.forward(xs[t][which], ys[which], ws);
      } catch (...) {
        ++errors[t];
        continue;
      }
      if (!same_bits(ys[which], expected[t][which])) ++mismatches[t];
    }
  });
  for (int i = 0; i < n_threads; ++i) {
    INFO("thread " << i << " (" << size_of(i, 0) << " and " << size_of(i, 1) << " tokens)");
    CHECK(errors[static_cast<std::size_t>(i)] == 0);
    CHECK(mismatches[static_cast<std::size_t>(i)] == 0);
  }
}

constexpr MoEConfig k_cfg{.d_model = k_d_model, .d_ff = k_d_ff, .n_experts = 8, .top_k = 2};

moe::MixtralMoE mixtral() {
  moe::MixtralMoE layer(k_cfg);
  layer.init(11);
  return layer;
}

// A layer whose router carries a micro-batch and a global-batch balance loss.
auto with_global_batch_loss() {
  using namespace moe;
  using Router = routers::WithLosses<routers::TopKRouter<float>, losses::SwitchLoss, losses::GlobalBatchLoss>;
  MoELayer<Router, experts::SwiGLU<float>> layer(
      Router(routers::TopKRouter<float>(k_cfg), losses::SwitchLoss{}, losses::GlobalBatchLoss(1e-2)),
      experts::SwiGLU<float>(k_cfg));
  layer.init(14);
  return layer;
}

// Everything gradients are kept for, as one vector per parameter in visit order.
template <class Layer>
std::vector<std::vector<float>> gradients(Layer& layer) {
  std::vector<std::vector<float>> grads;
  layer.visit_parameters([&](const std::string&, moe::Parameter<float>& p) {
    const auto g = p.grad();
    grads.emplace_back(g.data(), g.data() + g.rows() * g.cols());
  });
  return grads;
}

}  // namespace

TEST_CASE("Concurrency tests reach the layer's parallel regions with a team in every thread", "[concurrency]") {
  // Vacuity guard: with fewer OpenMP threads, or sizes under the layer's thresholds, the tests below would
  // not race the OpenMP teams against each other.
#if defined(_OPENMP)
  CHECK(team_size_in_std_thread() == k_omp_threads);
#else
  WARN("built without OpenMP: only the std::threads run at once");
  CHECK(team_size_in_std_thread() == 1);
#endif
  const Index largest = k_sizes[std::size(k_sizes) - 1];
  const double slots = double(largest) * double(k_cfg.top_k);
  CHECK(slots * double(k_d_ff) * double(k_d_model) >= moe::detail::k_parallel_min_work);          // experts
  CHECK(double(largest) * double(k_cfg.n_experts) * double(k_d_model) >= moe::detail::k_parallel_min_work);  // router
  CHECK(slots * double(k_d_model) >= moe::detail::k_parallel_min_work);                           // combine
}

TEST_CASE("T1: 16 threads x 200 forwards on one shared const layer give the serial results", "[concurrency]") {
  forwards_match_serial(mixtral, 16, 200);
}

TEST_CASE("T1: heterogeneous banks, a capacity-limited router and bf16/int8 weights, shared by 4 threads",
          "[concurrency]") {
  using namespace moe;
  SECTION("LoRA, GRU, zero-computation and shared experts") {
    using Layer = MoELayer<routers::TopKSoftmax<float>, experts::SwiGLU<float>, experts::LoRASwiGLU<float>,
                           experts::GRU<float>, experts::ConstantExperts<float>, experts::CopyExperts<float>,
                           experts::ZeroExperts<float>, experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>>;
    forwards_match_serial(
        [] {
          const auto part = [](Index n) { return MoEConfig{.d_model = k_d_model, .d_ff = k_d_ff, .n_experts = n, .top_k = 1}; };
          Layer layer(routers::TopKSoftmax<float>({.d_model = k_d_model, .d_ff = k_d_ff, .n_experts = 9, .top_k = 2}),
                      experts::SwiGLU<float>(part(2)), experts::LoRASwiGLU<float>(part(2), {.rank = 4}),
                      experts::GRU<float>(part(2)), experts::ConstantExperts<float>(1, k_d_model),
                      experts::CopyExperts<float>(1, k_d_model), experts::ZeroExperts<float>(1, k_d_model),
                      experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>(part(1)));
          layer.init(12);
          return layer;
        },
        4, 50);
  }
  SECTION("capacity-limited router, and a router with loss policies (a global-batch loss included)") {
    using Capped = routers::CapacityLimited<routers::TopKRouter<float>>;
    forwards_match_serial(
        [] {
          MoELayer<Capped, experts::SwiGLU<float>> layer(
              Capped(routers::TopKRouter<float>(k_cfg, routers::presets::mixtral()), {.capacity_factor = 0.75}),
              experts::SwiGLU<float>(k_cfg));
          layer.init(13);
          return layer;
        },
        4, 50);
    forwards_match_serial(with_global_batch_loss, 4, 50);
  }
  SECTION("bf16 and int8 weight storage (packing converts)") {
    const auto with = [&]<class Storage>(Storage) {
      using Layer = MoELayer<routers::TopKSoftmax<float>,
                             experts::FFN<float, kernels::SiLU, true, kernels::default_arch, Storage>>;
      forwards_match_serial(
          [] {
            Layer layer(k_cfg);
            layer.init(15);
            return layer;
          },
          4, 50);
    };
    with(kernels::BF16Weights{});
    with(kernels::Int8Weights{});
    with(kernels::Int4Weights<>{});
  }
}

// Concurrent training forwards on one layer (const), each recording into its own context, then their
// backwards in thread order, against forward i + backward i on one thread with a fresh context each.
template <class Make>
void concurrent_training_matches_serial(Make&& make) {
  constexpr int n_threads = 4;
  auto shared = make();
  auto twin = make();
  std::vector<RowMatrix<float>> xs, dys;
  for (int i = 0; i < n_threads; ++i) {
    xs.push_back(tokens(size_of(i, 0), 2000 + static_cast<std::uint64_t>(i)));
    dys.push_back(tokens(size_of(i, 0), 3000 + static_cast<std::uint64_t>(i)));
  }
  std::vector<RowMatrix<float>> ys_ref, dxs_ref;
  std::vector<std::vector<Index>> ids_ref;
  std::vector<double> aux_ref;
  {
    OmpThreads serial(1);
    twin.zero_grad();
    for (int i = 0; i < n_threads; ++i) {
      const auto t = static_cast<std::size_t>(i);
      moe::TrainingContext<float> ctx;
      RowMatrix<float> y(xs[t].rows(), k_d_model), dx(xs[t].rows(), k_d_model);
      const auto res = std::as_const(twin).forward(xs[t], y, ctx);
      ids_ref.emplace_back(res.expert_ids.begin(), res.expert_ids.end());
      aux_ref.push_back(res.aux_loss);
      twin.backward(dys[t], dx, ctx);
      ys_ref.push_back(y);
      dxs_ref.push_back(dx);
    }
  }
  shared.zero_grad();
  std::vector<moe::TrainingContext<float>> ctxs(n_threads);
  std::vector<RowMatrix<float>> ys(n_threads);
  std::vector<std::vector<Index>> ids(n_threads);
  std::vector<double> aux(n_threads);
  run_together(n_threads, [&](int i) {
    const auto t = static_cast<std::size_t>(i);
    ys[t].resize(xs[t].rows(), k_d_model);
    const auto res = std::as_const(shared).forward(xs[t], ys[t], ctxs[t]);
    ids[t].assign(res.expert_ids.begin(), res.expert_ids.end());
    aux[t] = res.aux_loss;
  });
  // The reduction: backwards one after another, in thread order, on the calling thread.
  for (std::size_t t = 0; t < static_cast<std::size_t>(n_threads); ++t) {
    INFO("thread " << t);
    CHECK(same_bits(ys[t], ys_ref[t]));
    CHECK(ids[t] == ids_ref[t]);
    CHECK(aux[t] == aux_ref[t]);
    RowMatrix<float> dx(xs[t].rows(), k_d_model);
    shared.backward(dys[t], dx, ctxs[t]);
    CHECK(same_bits(dx, dxs_ref[t]));
  }
  CHECK(gradients(shared) == gradients(twin));
}

TEST_CASE("T2: concurrent training forwards on one layer, then their backwards in order, equal the serial steps",
          "[concurrency]") {
  concurrent_training_matches_serial(mixtral);
}

TEST_CASE(
    "T2: concurrent training forwards on one layer with a global-batch loss: each context holds its own "
    "counts, nothing shared is written (ThreadSanitizer stage)",
    "[concurrency]") {
  concurrent_training_matches_serial(with_global_batch_loss);
}

TEST_CASE("T2: 8 threads x 10 training steps, each on its own replica of the layer, give the serial gradients",
          "[concurrency]") {
  constexpr int n_threads = 8, steps = 10;
  const RowMatrix<float> x = tokens(130, 4000), dy = tokens(130, 4001);
  // Serial reference: `steps` steps that accumulate (zero_grad once), so a step reads the previous grads.
  RowMatrix<float> y_ref(x.rows(), k_d_model), dx_ref(x.rows(), k_d_model);
  std::vector<std::vector<float>> grads_ref;
  {
    OmpThreads serial(1);
    auto layer = mixtral();
    moe::TrainingContext<float> ctx;
    for (int s = 0; s < steps; ++s) {
      layer.forward(x, y_ref, ctx);
      layer.backward(dy, dx_ref, ctx);
    }
    grads_ref = gradients(layer);
  }
  std::vector<int> mismatches(n_threads, 0), errors(n_threads, 0);
  std::vector<std::vector<std::vector<float>>> grads(n_threads);
  run_together(n_threads, [&](int i) {
    const auto t = static_cast<std::size_t>(i);
    try {
      auto layer = mixtral();
      moe::TrainingContext<float> ctx;
      RowMatrix<float> y(x.rows(), k_d_model), dx(x.rows(), k_d_model);
      for (int s = 0; s < steps; ++s) {
        layer.forward(x, y, ctx);
        layer.backward(dy, dx, ctx);
      }
      if (!same_bits(y, y_ref) || !same_bits(dx, dx_ref)) ++mismatches[t];
      grads[t] = gradients(layer);
    } catch (...) {
      ++errors[t];
    }
  });
  for (std::size_t t = 0; t < static_cast<std::size_t>(n_threads); ++t) {
    INFO("thread " << t);
    CHECK(errors[t] == 0);
    CHECK(mismatches[t] == 0);
    CHECK(grads[t] == grads_ref);
  }
}
