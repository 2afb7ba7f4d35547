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
