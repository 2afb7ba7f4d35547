#pragma once
// Heap bytes in use and their peak, for tests that bound the memory a call needs (docs/models.md: loading a bank
// takes at most 1.25 × its stored size). Replaces malloc, calloc, realloc, free, aligned_alloc, posix_memalign and
// memalign by counting wrappers around glibc's __libc_* entry points, so every allocation is seen: operator new,
// std::vector, xsimd's aligned allocator, OpenMP. Include it from exactly one translation unit of an executable.
// Sanitizer runtimes replace malloc themselves: there MOE_TEST_COUNTS_MALLOC is 0 and nothing is replaced.

#include <malloc.h>

#include <atomic>
#include <cstddef>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__GLIBC__)
#define MOE_TEST_COUNTS_MALLOC 0
#else
#define MOE_TEST_COUNTS_MALLOC 1
#endif

namespace moe::test {
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
void* malloc(std::size_t n) {
  return moe_test_counted(__libc_malloc(n));
}
void* calloc(std::size_t n, std::size_t size) {
  return moe_test_counted(__libc_calloc(n, size));
}
void* memalign(std::size_t align, std::size_t n) {
  return moe_test_counted(__libc_memalign(align, n));
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  return moe_test_counted(__libc_memalign(align, n));
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return 12;  // ENOMEM
  *out = moe_test_counted(p);
  return 0;
}
void free(void* p) {
  if (p == nullptr) return;
  moe::test::note_heap(-static_cast<long long>(malloc_usable_size(p)));
  __libc_free(p);
}
void* realloc(void* p, std::size_t n) {
  const long long before = p != nullptr ? static_cast<long long>(malloc_usable_size(p)) : 0;
  void* q = __libc_realloc(p, n);
  if (q != nullptr || n == 0)
    moe::test::note_heap((q != nullptr ? static_cast<long long>(malloc_usable_size(q)) : 0) - before);
  return q;
}
}
#endif
