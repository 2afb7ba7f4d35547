// RELIABILITY.md M1: after one warm-up call at a size, forward at the same or a smaller n_tokens performs
// no heap allocation. Global operator new is replaced by a counting one (not in sanitizer builds, whose
// runtime replaces it too).

#include <atomic>
#include <cstdlib>
#include <new>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "support/random.hpp"

namespace {
std::atomic<long> g_allocations{0};
}

// The replacements pair malloc with free on purpose; GCC 12 cannot see that through the inlined allocator.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  ++g_allocations;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  ++g_allocations;
  const std::size_t align = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(align, (n + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

TEST_CASE("MoELayer::forward allocates nothing after warm-up at the same or smaller sizes", "[alloc]") {
  moe::MixtralMoE layer(moe::MoEConfig{.d_model = 64, .d_ff = 160, .n_experts = 8, .top_k = 2});
  layer.init(4);
  moe::Rng rng(6);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 100, 64);
  moe::RowMatrix<float> y(100, 64);
  moe::Workspace ws;
  layer.forward(x, y, ws);  // warm-up: sizes the workspace (and starts the OpenMP team)

  const long before = g_allocations.load();
  for (moe::Index t : {100, 1, 37, 99}) layer.forward(x.topRows(t), y.topRows(t), ws);
  const long during = g_allocations.load() - before;
  REQUIRE(during == 0);

  // The counter is live: a bigger batch must grow the workspace.
  const moe::RowMatrix<float> big = moe::test::normal_matrix<float>(rng, 101, 64);
  moe::RowMatrix<float> ybig(101, 64);
  const long before_big = g_allocations.load();
  layer.forward(big, ybig, ws);
  REQUIRE(g_allocations.load() - before_big >= 1);
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
    const long before = g_allocations.load();
    for (moe::Index t : {100, 1, 37}) layer.forward(x.topRows(t), y.topRows(t), ws);
    CHECK(g_allocations.load() - before == 0);
    // A weight update re-packs in place: still no allocation.
    layer.template bank<0>().w1(0)(0, 0) += 1.0f;
    const long before_repack = g_allocations.load();
    layer.forward(x, y, ws);
    CHECK(g_allocations.load() - before_repack == 0);
  };
  check(moe::kernels::NativeWeights{});
  check(moe::kernels::BF16Weights{});
  check(moe::kernels::Int8Weights{});
}

namespace {

// Warm-up at 100 tokens, then forwards at 100, 1, 37 tokens: no heap allocation.
template <class Layer>
long allocations_after_warm_up(Layer& layer) {
  layer.init(4);
  moe::Rng rng(6);
  const moe::RowMatrix<float> x = moe::test::normal_matrix<float>(rng, 100, layer.d_model());
  moe::RowMatrix<float> y(100, layer.d_model());
  moe::Workspace ws;
  layer.forward(x, y, ws);
  const long before = g_allocations.load();
  for (moe::Index t : {100, 1, 37}) layer.forward(x.topRows(t), y.topRows(t), ws);
  return g_allocations.load() - before;
}

}  // namespace

TEST_CASE("Every router and heterogeneous banks allocate nothing after warm-up", "[alloc]") {
  using namespace moe;
  const MoEConfig cfg{.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 2};
  using Capped = routers::CapacityLimited<routers::TopKRouter<float>>;
  MoELayer<Capped, experts::SwiGLU<float>> capped(Capped(routers::TopKRouter<float>(cfg, routers::presets::mixtral()),
                                                          {.capacity_factor = 0.75}),
                                                   experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(capped) == 0);
  MoELayer<routers::TopKRouter<float>, experts::SwiGLU<float>> deepseek(
      routers::TopKRouter<float>({.d_model = 32, .d_ff = 48, .n_experts = 16, .top_k = 2},
                                 routers::presets::deepseek_v3()),
      experts::SwiGLU<float>({.d_model = 32, .d_ff = 48, .n_experts = 16, .top_k = 2}));
  CHECK(allocations_after_warm_up(deepseek) == 0);
  MoELayer<routers::NullExpertRouter<float>, experts::SwiGLU<float>> adamoe(
      routers::NullExpertRouter<float>(cfg, {.n_null_experts = 3}), experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(adamoe) == 0);
  MoELayer<routers::DenseToSparseGate<float>, experts::SwiGLU<float>> evomoe(
      routers::DenseToSparseGate<float>({.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 6}),
      experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(evomoe) == 0);
  MoELayer<routers::ExpertChoiceRouter<float>, experts::SwiGLU<float>> expert_choice(
      routers::ExpertChoiceRouter<float>({.d_model = 32, .d_ff = 48, .n_experts = 6, .top_k = 6}),
      experts::SwiGLU<float>(cfg));
  CHECK(allocations_after_warm_up(expert_choice) == 0);
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
  CHECK(allocations_after_warm_up(mixed) == 0);
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
  CHECK(allocations_after_warm_up(single) == 0);

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
  const long before = g_allocations.load();
  step();
  CHECK(g_allocations.load() - before == 0);
}
