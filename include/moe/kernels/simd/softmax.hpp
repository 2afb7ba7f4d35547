#pragma once
/// @file kernels/simd/softmax.hpp
/// @brief Row softmax with xsimd: a max pass, an exp-and-sum pass and a scale pass, each a vector loop
/// with a scalar tail. Same results as kernels/reference/softmax.hpp within RELIABILITY.md N3.

#include <cassert>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

MOE_KERNEL_DIAGNOSTICS_PUSH

namespace moe::kernels {

namespace detail {

/// Softmax of a row whose max is +inf: the +inf entries share the weight, everything else is 0.
/// Rare (it needs an overflowed logit), so it stays scalar.
template <class T>
void softmax_row_infinite_max(const T* in, T* out, Index n) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  Index count = 0;
  for (Index i = 0; i < n; ++i) count += in[i] == inf ? 1 : 0;
  const T share = T(1) / static_cast<T>(count);
  for (Index i = 0; i < n; ++i) out[i] = in[i] == inf ? share : T(0);
}

}  // namespace detail

/// Numerically stable softmax of one row: out[i] = exp(in[i] - max) / sum_j exp(in[j] - max).
///
/// Non-finite policy: NaN entries count as -inf; if the max is +inf the +inf entries share weight
/// 1/count(+inf) and every other entry gets 0; if no entry is above -inf the whole row is 0. The output
/// never contains NaN for such inputs. No heap allocation.
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param in row of n logits; may equal `out`
/// @param out row of n probabilities
/// @param n row length; 0 is a no-op
template <class Arch, class T>
void softmax_row(Arch, const T* in, T* out, Index n) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::softmax_row: T must be float or double");
  assert(n >= 0);
  if (n <= 0) return;
  constexpr T inf = std::numeric_limits<T>::infinity();

  // Pass 1: the max, with NaN read as -inf.
  T max = -inf;
  Index i = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index lanes = static_cast<Index>(B::size);
    const Index n_vec = n - n % lanes;
    if (n_vec > 0) {
      B vmax(-inf);
      for (; i < n_vec; i += lanes) {
        const B v = B::load_unaligned(in + i);
        // select, not max(v, vmax): whether max() propagates a NaN operand depends on the ISA.
        vmax = xsimd::max(vmax, xsimd::select(xsimd::isnan(v), B(-inf), v));
      }
      alignas(Arch::alignment()) T lane[B::size];  // (lanes)
      vmax.store_aligned(lane);
      for (std::size_t l = 0; l < B::size; ++l) max = lane[l] > max ? lane[l] : max;
    }
  }
  for (; i < n; ++i) max = in[i] > max ? in[i] : max;  // a NaN compares false

  if (max == -inf) {
    for (Index j = 0; j < n; ++j) out[j] = T(0);
    return;
  }
  if (max == inf) {
    detail::softmax_row_infinite_max(in, out, n);
    return;
  }

  // Pass 2: out = exp(in - max), summed. Every term is <= 1 and the max term is exactly 1, so the sum
  // is >= 1 and the scale below is finite. The scalar loop sums in double: a sequential f32 sum of ~1000
  // terms would lose ~sqrt(n) u, while the vector loop already splits the sum over its lanes.
  double sum = 0.0;
  i = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index lanes = static_cast<Index>(B::size);
    const Index n_vec = n - n % lanes;
    if (n_vec > 0) {
      const B vmax(max);
      // exp's argument is floored at -1000 (below every exp underflow, so exp gives exactly 0 either way):
      // xsimd's exp converts round(x / ln 2) to an integer, and for -inf (a NaN or -inf logit, or
      // -FLT_MAX - max) that conversion is undefined (the double -> int64 cast is scalar on AVX2 and
      // AVX-512F; -fsanitize=float-cast-overflow stops there).
      const B lowest_arg(T(-1000));
      B vsum(T(0));
      for (; i < n_vec; i += lanes) {
        const B v = B::load_unaligned(in + i);
        const B e = xsimd::exp(xsimd::max(xsimd::select(xsimd::isnan(v), B(-inf), v) - vmax, lowest_arg));  // exp(-1000) = 0
        e.store_unaligned(out + i);
        vsum += e;
      }
      sum = static_cast<double>(xsimd::hadd(vsum));
    }
  }
  for (; i < n; ++i) {
    const T e = std::isnan(in[i]) ? T(0) : std::exp(in[i] - max);
    out[i] = e;
    sum += static_cast<double>(e);
  }

  // Pass 3: scale by 1 / sum.
  const T scale = static_cast<T>(1.0 / sum);
  i = 0;
  if constexpr (has_simd<T, Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr Index lanes = static_cast<Index>(B::size);
    const Index n_vec = n - n % lanes;
    const B vscale(scale);
    for (; i < n_vec; i += lanes) (B::load_unaligned(out + i) * vscale).store_unaligned(out + i);
  }
  for (; i < n; ++i) out[i] *= scale;
}

}  // namespace moe::kernels

MOE_KERNEL_DIAGNOSTICS_POP
