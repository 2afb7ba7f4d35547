#pragma once
// Counting replacements of malloc, calloc, realloc, free, aligned_alloc, posix_memalign and memalign, for tests
// that require "allocates nothing" (RELIABILITY.md M1: the calls) or bound the memory a call needs (docs/models.md:
// loading a bank takes at most 1.25 × its stored size: the bytes and their peak). This executable's definitions
// win over glibc's for every caller (libstdc++, libgomp, Eigen, xsimd's aligned allocator, glibc itself) and
// forward to glibc's __libc_* entry points (exported since glibc 2.2.5, still in 2.36). Include it from exactly one
// translation unit of an executable. Sanitizer runtimes replace malloc themselves: there MOE_TEST_COUNTS_MALLOC is
// 0, nothing is replaced and the counters stay 0.

#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstddef>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__GLIBC__)
#define MOE_TEST_COUNTS_MALLOC 0
#else
#define MOE_TEST_COUNTS_MALLOC 1
#endif

namespace moe::test {
inline std::atomic<long> malloc_calls{0};            // calls that allocate (all but free), except set-aside ones
inline std::atomic<long> set_aside_malloc_calls{0};  // calls whose return address set_aside_caller claims
/// Tells apart the callers a test counts separately (no_alloc_test: libgomp's) by the return address of the
/// call; null (the default) counts every call in malloc_calls.
inline std::atomic<bool (*)(const void* return_address)> set_aside_caller{nullptr};

inline std::atomic<long long> heap_bytes{0};  // usable bytes of the live blocks
inline std::atomic<long long> heap_peak{0};   // the most heap_bytes reached since reset_heap_peak()
/// Starts a new peak from the bytes in use now.
inline void reset_heap_peak() {
  heap_peak.store(heap_bytes.load());
}
inline void note_heap(long long delta) {
  const long long now = heap_bytes.fetch_add(delta) + delta;
  long long peak = heap_peak.load();
  while (now > peak && !heap_peak.compare_exchange_weak(peak, now)) {
  }
}
inline void note_call(const void* return_address) {
  const auto set_aside = set_aside_caller.load(std::memory_order_relaxed);
  ++(set_aside != nullptr && set_aside(return_address) ? set_aside_malloc_calls : malloc_calls);
}
}  // namespace moe::test

#if MOE_TEST_COUNTS_MALLOC
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

static void* moe_test_counted(void* p) {
  if (p != nullptr) moe::test::note_heap(static_cast<long long>(malloc_usable_size(p)));
  return p;
}
// noinline: __builtin_return_address(0) must be the caller's address.
__attribute__((noinline)) void* malloc(std::size_t n) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  return moe_test_counted(__libc_malloc(n));
}
__attribute__((noinline)) void* calloc(std::size_t n, std::size_t size) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  return moe_test_counted(__libc_calloc(n, size));
}
__attribute__((noinline)) void* memalign(std::size_t align, std::size_t n) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  return moe_test_counted(__libc_memalign(align, n));
}
__attribute__((noinline)) void* aligned_alloc(std::size_t align, std::size_t n) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  return moe_test_counted(__libc_memalign(align, n));
}
__attribute__((noinline)) int posix_memalign(void** out, std::size_t align, std::size_t n) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = moe_test_counted(p);
  return 0;
}
__attribute__((noinline)) void* realloc(void* p, std::size_t n) noexcept {
  moe::test::note_call(__builtin_return_address(0));
  const long long before = p != nullptr ? static_cast<long long>(malloc_usable_size(p)) : 0;
  void* q = __libc_realloc(p, n);
  if (q != nullptr || n == 0)
    moe::test::note_heap((q != nullptr ? static_cast<long long>(malloc_usable_size(q)) : 0) - before);
  return q;
}
void free(void* p) noexcept {
  if (p == nullptr) return;
  moe::test::note_heap(-static_cast<long long>(malloc_usable_size(p)));
  __libc_free(p);
}
}
#endif
