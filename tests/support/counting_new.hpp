#pragma once
// A counting replacement of the global operator new and delete, for tests that require "allocates nothing"
// (RELIABILITY.md M1, B5): they read moe::test::operator_new_calls around the call. Include it from exactly one
// translation unit of an executable (it defines the replacements). Sanitizer runtimes replace operator new
// themselves: there MOE_TEST_COUNTS_NEW is 0, nothing is replaced and the counter stays 0.

#include <atomic>
#include <cstdlib>
#include <new>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOE_TEST_COUNTS_NEW 0
#else
#define MOE_TEST_COUNTS_NEW 1
#endif

namespace moe::test {
inline std::atomic<long> operator_new_calls{0};
}  // namespace moe::test

#if MOE_TEST_COUNTS_NEW
// The replacements pair malloc with free on purpose; GCC 12 cannot see that through the inlined allocator.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  ++moe::test::operator_new_calls;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  ++moe::test::operator_new_calls;
  const std::size_t align = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(align, (n + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
#endif
