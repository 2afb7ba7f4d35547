#pragma once
/// @file kernels/arch.hpp
/// @brief Instruction-set tags for the kernels. The ISA is a type chosen once, at the top (the layer's
/// `Arch` parameter), never a runtime branch inside token loops.
///
/// Every SIMD kernel in `kernels/simd/` is a template on `Arch`:
///  - an xsimd architecture (`xsimd::avx512bw`, `xsimd::avx2`, ...) runs the vector loop plus a scalar tail;
///  - `moe::kernels::scalar` runs the scalar loop only: the portable fallback, also used when xsimd has no
///    architecture for the build flags.

#include <cstddef>
#include <type_traits>

#include <xsimd/xsimd.hpp>

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

}  // namespace moe::kernels
