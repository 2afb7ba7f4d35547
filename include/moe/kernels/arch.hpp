#pragma once
/// @file kernels/arch.hpp
/// @brief Instruction-set tags for the kernels. The ISA is a type chosen once, at the top (the layer's
/// `Arch` parameter), never a runtime branch inside token loops.
///
/// Every SIMD kernel in `kernels/simd/` is a template on `Arch`:
///  - an xsimd architecture (`xsimd::avx512bw`, `xsimd::avx2`, ...) runs the vector loop plus a scalar tail;
///  - `moe::kernels::scalar` runs the scalar loop only: the portable fallback, also used when xsimd has no
///    architecture for the build flags.

#include <cmath>
#include <cstddef>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../config.hpp"

// GCC 12 reports -Wmaybe-uninitialized inside avx512fintrin.h (the _mm512_undefined_* idiom, GCC bug
// 105593, fixed in GCC 13) wherever xsimd's AVX-512 exp/erfc/hadd get inlined into our code. Kernel
// headers wrap their bodies in these two macros.
#if defined(__GNUC__) && !defined(__clang__)
#define MOE_KERNEL_DIAGNOSTICS_PUSH \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MOE_KERNEL_DIAGNOSTICS_POP _Pragma("GCC diagnostic pop")
#else
#define MOE_KERNEL_DIAGNOSTICS_PUSH
#define MOE_KERNEL_DIAGNOSTICS_POP
#endif

namespace moe::kernels {

/// Arch tag: no vector instructions; every kernel runs its scalar loop.
struct scalar {
  static constexpr const char* name() { return "scalar"; }
};

#if defined(XSIMD_NO_SUPPORTED_ARCHITECTURE) || defined(MOE_FORCE_SCALAR)
using default_arch = scalar;
#else
/// The best architecture enabled by the compile flags (e.g. avx512bw with -march=native on this machine).
using default_arch = xsimd::default_arch;
#endif

/// True when `Arch` runs vector code for element type `T`.
template <class T, class Arch>
inline constexpr bool has_simd = !std::is_same_v<Arch, scalar>;

/// Number of `T` lanes per register for `Arch` (1 for the scalar fallback).
template <class T, class Arch>
constexpr std::size_t lanes() {
  if constexpr (has_simd<T, Arch>) {
    return xsimd::batch<T, Arch>::size;
  } else {
    return 1;
  }
}

namespace detail {

/// a * b + c, fused when the hardware has FMA, so the vector body, the scalar tail and the scalar Arch give
/// the same bits; a plain `a * b + c` leaves contraction to the optimiser, which does not always contract.
template <class T>
  requires std::is_floating_point_v<T>
T fmadd(T a, T b, T c) {
#if defined(FP_FAST_FMA) && defined(FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// a * b + c on batches, fused where the ISA has FMA. xsimd 8.1's fma() is fused for fma3<...> but a
/// separate multiply and add for the AVX-512 archs, fused only if the optimiser contracts it.
template <class T, class A>
xsimd::batch<T, A> fmadd(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b, const xsimd::batch<T, A>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_fmadd_ps(a, b, c);
    } else {
      return _mm512_fmadd_pd(a, b, c);
    }
  }
#endif
  return xsimd::fma(a, b, c);
}

/// Loads V from p: a batch load for xsimd batches, a plain read for scalars.
template <class V, class T>
V load(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else {
    return V::load_unaligned(p);
  }
}

/// Stores v to p (batch or scalar).
template <class V, class T>
void store(const V& v, T* p) {
  if constexpr (std::is_same_v<V, T>) {
    *p = v;
  } else {
    v.store_unaligned(p);
  }
}

/// The loop skeleton of every element-wise kernel: `op(V{}, i)` for i in [0, n), first with V a batch of
/// `Arch` over whole registers, then with V = T for the scalar tail (or for everything when Arch is scalar).
/// `op` reads and writes through load<V>/store so one body serves both widths.
template <class T, class Arch, class Op>
void elementwise(Index n, Op&& op) {
  Index i = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index width = static_cast<Index>(B::size);
    for (const Index n_vec = n - n % width; i < n_vec; i += width) op(B{}, i);
  }
  for (; i < n; ++i) op(T{}, i);
}

}  // namespace detail
}  // namespace moe::kernels
