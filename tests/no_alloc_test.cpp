// RELIABILITY.md M1: after one warm-up call at a size, forward at the same or a smaller n_tokens performs
// no heap allocation. Three counters watch the measured calls (not in sanitizer builds, whose runtimes
// replace the same functions):
// - global operator new, replaced by a counting one (support/counting_new.hpp);
// - the malloc family, interposed for every caller (support/counting_malloc.hpp).
//   Calls made by GCC's OpenMP runtime are counted apart: libgomp allocates (and frees) a team for every
//   parallel region that runs on one thread (an `if` clause below the layer's work threshold, or a team of
//   one), so each small forward costs a few memalign/free pairs inside libgomp. That is the runtime's, and
//   known (the layer would have to branch around its parallel regions instead of using `if`); everything
//   else must not allocate;
// - Eigen's own guard (its test/nomalloc.cpp): EIGEN_RUNTIME_NO_MALLOC and set_is_malloc_allowed(false)
//   around the calls. Its check is an eigen_assert, which NDEBUG turns off, so this file defines
//   eigen_assert to count failures instead: the guard reports in Release too, and every other Eigen
//   assertion in these calls is counted with it.

// Both before any Eigen include (catch.hpp includes none).
#define EIGEN_RUNTIME_NO_MALLOC
void moe_test_eigen_assert_failed(const char* condition);
#define eigen_assert(x) (static_cast<bool>(x) ? void(0) : ::moe_test_eigen_assert_failed(#x))

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <ostream>

#include <link.h>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/counting_malloc.hpp"
#include "support/counting_new.hpp"
#include "support/random.hpp"

namespace {
std::atomic<long> g_eigen_asserts{0};
std::atomic<const char*> g_first_eigen_assert{nullptr};

// Keeps the compiler from removing an allocation whose memory is never read.
void escape(const void* p) { asm volatile("" : : "g"(p) : "memory"); }

// libgomp's loaded segments, found once before the first measurement.
struct Range {
  std::uintptr_t lo = 0, hi = 0;
};
Range g_libgomp[8];
std::atomic<int> g_n_libgomp{0};

void find_libgomp() {
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void*) {
        if (info->dlpi_name == nullptr || std::strstr(info->dlpi_name, "libgomp") == nullptr) return 0;
        int n = 0;
        for (int i = 0; i < info->dlpi_phnum && n < 8; ++i) {
          const auto& ph = info->dlpi_phdr[i];
          if (ph.p_type == PT_LOAD) g_libgomp[n++] = {info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz};
        }
        g_n_libgomp.store(n);
        return 1;
      },
      nullptr);
}

bool from_libgomp(const void* return_address) {
  const auto a = reinterpret_cast<std::uintptr_t>(return_address);
  const int n = g_n_libgomp.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i)
    if (a >= g_libgomp[i].lo && a < g_libgomp[i].hi) return true;
  return false;
}

// Allocations seen during a call. Equality ignores omp_mallocs (see the file comment).
struct Counts {
  long news = 0;           ///< operator new
  long mallocs = 0;        ///< malloc family, from anywhere but libgomp (operator new's own malloc included)
  long eigen_asserts = 0;  ///< Eigen's guard (and any other failed eigen_assert)
  long omp_mallocs = 0;    ///< malloc family, from libgomp
  bool operator==(const Counts& o) const {
    return news == o.news && mallocs == o.mallocs && eigen_asserts == o.eigen_asserts;
  }
};
std::ostream& operator<<(std::ostream& os, const Counts& c) {
  os << "{news " << c.news << ", mallocs " << c.mallocs << ", eigen_asserts " << c.eigen_asserts
     << " (libgomp's mallocs " << c.omp_mallocs << ", not compared)";
  if (const char* first = g_first_eigen_assert.load(); c.eigen_asserts > 0 && first != nullptr)
    os << ", first: " << first;
  return os << "}";
}
Counts counts() {
  return {moe::test::operator_new_calls.load(), moe::test::malloc_calls.load(), g_eigen_asserts.load(),
          moe::test::set_aside_malloc_calls.load()};
}

// What f() allocated, with Eigen's guard on while it runs.
template <class F>
Counts allocations_in(F&& f) {
  static const bool found = (find_libgomp(), moe::test::set_aside_caller.store(from_libgomp), true);
  (void)found;
  const Counts before = counts();
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  const Counts after = counts();
  return {after.news - before.news, after.mallocs - before.mallocs, after.eigen_asserts - before.eigen_asserts,
          after.omp_mallocs - before.omp_mallocs};
}
}  // namespace

void moe_test_eigen_assert_failed(const char* condition) {
  ++g_eigen_asserts;
  const char* none = nullptr;
  g_first_eigen_assert.compare_exchange_strong(none, condition);
}

TEST_CASE("The allocation counters and Eigen's guard see what they should", "[alloc]") {
  // A heap Eigen matrix inside the guard trips it (so the guard is real), and its malloc is counted.
  const Counts eigen = allocations_in([] {
    Eigen::MatrixXf m(16, 16);
    escape(m.data());
  });
  CHECK(eigen.eigen_asserts >= 1);
  CHECK(eigen.mallocs >= 1);
  // The same matrix outside the guard does not.
  const long asserts_before = g_eigen_asserts.load();
  {
    Eigen::MatrixXf m(16, 16);
    escape(m.data());
  }
  CHECK(g_eigen_asserts.load() == asserts_before);
  // operator new reaches both counters.
  const Counts with_new = allocations_in([] {
    const auto p = std::make_unique<int[]>(100);
    escape(p.get());
  });
  CHECK(with_new.news >= 1);
  CHECK(with_new.mallocs >= 1);
  // A shared library's own call is interposed too: glibc's strdup calls malloc.
  const Counts in_libc = allocations_in([] {
    char* p = strdup("moe");
    escape(p);
    std::free(p);
  });
  CHECK(in_libc.mallocs >= 1);
#if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__)
  // libgomp's own calls are told apart: a parallel region on one thread makes it allocate its team.
  const Counts omp = allocations_in([] {
    int sum = 0;
#pragma omp parallel num_threads(1) reduction(+ : sum)
    sum += 1;
    escape(&sum);
  });
  CHECK(omp.omp_mallocs >= 1);
  CHECK(omp.mallocs == 0);
#endif
  // Growing a Workspace is counted.
  moe::Workspace ws;
  const Counts grow = allocations_in([&] { ws.reserve(1 << 20); });
  CHECK(grow.news == 1);
  CHECK(grow.mallocs >= 1);
  CHECK(allocations_in([&] { ws.reserve(1 << 10); }) == Counts{});
}

TEST_CASE("MoELayer::forward allocates nothing after warm-up at the same or smaller sizes", "[alloc]") {
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 64, .d_ff = 160, .n_experts = 8, .top_k = 2});
  layer.init(4);
  moe::Rng rng(6);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 100, 64);
  moe::RowMatrix<float> y(100, 64);
  moe::Workspace ws;
  layer.forward(x, y, ws);  // warm-up: sizes the workspace (and starts the OpenMP team)

  REQUIRE(allocations_in([&] {
            for (moe::Index t : {100, 1, 37, 99}) layer.forward(x.topRows(t), y.topRows(t), ws);
          }) == Counts{});

  // The counters are live: a bigger batch must grow the workspace.
  const moe::RowMatrix<float> big = moe::test::normal_matrix<float>(rng, 101, 64);
  moe::RowMatrix<float> ybig(101, 64);
  const Counts grow = allocations_in([&] { layer.forward(big, ybig, ws); });
  REQUIRE(grow.news >= 1);
  REQUIRE(grow.mallocs >= 1);
}

TEST_CASE("bf16 and int8 weight storage allocate nothing after warm-up either", "[alloc]") {
  const moe::MoEConfig cfg{.d_model = 64, .d_ff = 160, .n_experts = 8, .top_k = 2};
  auto check = [&]<class Storage>(Storage) {
    moe::MoELayer<moe::routers::TopKSoftmax<float>,
                  moe::experts::FFN<float, moe::kernels::SiLU, true, moe::kernels::default_arch, Storage>>
        layer(cfg);
    layer.init(4);
    moe::Rng rng(6);
    const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 100, 64);
    moe::RowMatrix<float> y(100, 64);
    moe::Workspace ws;
    layer.forward(x, y, ws);
    CHECK(allocations_in([&] {
            for (moe::Index t : {100, 1, 37}) layer.forward(x.topRows(t), y.topRows(t), ws);
          }) == Counts{});
    // A weight update re-packs in place: still no allocation.
    layer.template bank<0>().w1(0)(0, 0) += 1.0f;
    CHECK(allocations_in([&] { layer.forward(x, y, ws); }) == Counts{});
  };
  check(moe::kernels::NativeWeights{});
  check(moe::kernels::BF16Weights{});
  check(moe::kernels::Int8Weights{});
  check(moe::kernels::Int4Weights<>{});
}

namespace {

// Warm-up at 100 tokens, then forwards at 100, 1, 37 tokens: no heap allocation.
template <class Layer>
Counts allocations_after_warm_up(Layer& layer) {
  layer.init(4);
  moe::Rng rng(6);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 100, layer.d_model());
  moe::RowMatrix<float> y(100, layer.d_model());
  moe::Workspace ws;
  layer.forward(x, y, ws);
  return allocations_in([&] {
    for (moe::Index t : {100, 1, 37}) layer.forward(x.topRows(t), y.topRows(t), ws);
  });
}

}  // namespace

TEST_CASE("Every router and heterogeneous banks allocate nothing after warm-up", "[alloc]") {
  using namespace moe;
  const MoEConfig cfg{.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 2};
  using Capped = routers::CapacityLimited<routers::TopKRouter<float>>;
  MoELayer<Capped, experts::SwiGLU<float>> capped(Capped(routers::TopKRouter<float>(cfg, routers::presets::mixtral()),
                                                          {.capacity_factor = 0.75}),
                                                   experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(capped) == Counts{});
  MoELayer<routers::TopKRouter<float>, experts::SwiGLU<float>> deepseek(
      routers::TopKRouter<float>({.d_model = 32, .d_ff = 48, .n_experts = 16, .top_k = 2},
                                 routers::presets::deepseek_v3()),
      experts::SwiGLU<float>({.d_model = 32, .d_ff = 48, .n_experts = 16, .top_k = 2}));
  CHECK(allocations_after_warm_up(deepseek) == Counts{});
  MoELayer<routers::NullExpertRouter<float>, experts::SwiGLU<float>> adamoe(
      routers::NullExpertRouter<float>(cfg, {.n_null_experts = 3}), experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(adamoe) == Counts{});
  MoELayer<routers::DenseToSparseGate<float>, experts::SwiGLU<float>> evomoe(
      routers::DenseToSparseGate<float>({.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 6}),
      experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(evomoe) == Counts{});
  MoELayer<routers::ExpertChoiceRouter<float>, experts::SwiGLU<float>> expert_choice(
      routers::ExpertChoiceRouter<float>({.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 6}),
      experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(expert_choice) == Counts{});
  MoELayer<routers::TopKSoftmax<float>, experts::SwiGLU<float>, experts::LoRASwiGLU<float>, experts::GRU<float>,
           experts::ConstantExperts<float>, experts::CopyExperts<float>, experts::ZeroExperts<float>,
           experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>>
      mixed(routers::TopKSoftmax<float>({.d_model = 32, .d_ff = 48, .n_experts = 9, .top_k = 2}),
            experts::SwiGLU<float>({.d_model = 32, .d_ff = 48, .n_experts = 2, .top_k = 1}),
            experts::LoRASwiGLU<float>({.d_model = 32, .d_ff = 48, .n_experts = 2, .top_k = 1}, {.rank = 4}),
            experts::GRU<float>({.d_model = 32, .d_ff = 48, .n_experts = 2, .top_k = 1}),
            experts::ConstantExperts<float>(1, 32), experts::CopyExperts<float>(1, 32),
            experts::ZeroExperts<float>(1, 32),
            experts::Shared<experts::SwiGLU<float>, experts::SigmoidSharedGate>(
                MoEConfig{.d_model = 32, .d_ff = 48, .n_experts = 1, .top_k = 1}));
  CHECK(allocations_after_warm_up(mixed) == Counts{});
}

TEST_CASE("Loss policies, gating residuals and a training stack allocate nothing after warm-up", "[alloc]") {
  using namespace moe;
  const MoEConfig cfg{.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 2};
  using Lossy = routers::WithLosses<routers::GatingResidual<routers::TopKRouter<float>>, losses::SwitchLoss,
                                    losses::GlobalBatchLoss, losses::SequenceBalanceLoss, losses::ZLoss>;
  using Layer = MoELayer<Lossy, experts::SwiGLU<float>>;
  const auto make = [&] {
    return Layer(Lossy(routers::GatingResidual(routers::TopKRouter<float>(cfg)), losses::SwitchLoss{},
                       losses::GlobalBatchLoss(1e-2), losses::SequenceBalanceLoss{}, losses::ZLoss{}),
                 experts::SwiGLU<float>(cfg));
  };
  Layer single = make();
  CHECK(allocations_after_warm_up(single) == Counts{});

  std::vector<Layer> layers;
  layers.push_back(make());
  layers.push_back(make());
  Stack<Layer> stack(std::move(layers));
  stack.init(5);
  Rng rng(7);
  const RowMatrix<float> x = test::normal_matrix<float>(rng, 64, 32);
  RowMatrix<float> y(64, 32), dx(64, 32);
  StackContext<float> ctx;
  const auto step = [&] {
    stack.zero_grad();
    stack.forward(x, y, ctx);
    stack.backward(y, dx, ctx);
  };
  step();
  step();
  CHECK(allocations_in(step) == Counts{});
}
