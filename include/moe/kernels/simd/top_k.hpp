#pragma once
/// @file kernels/simd/top_k.hpp
/// @brief Top-k selection with xsimd: k vector sweeps over the scores, each finding the best
/// (score, id) that ranks after the previous pick. Gives exactly the ids of kernels/reference/top_k.hpp.

#include <bit>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../../config.hpp"
#include "../arch.hpp"

namespace moe::kernels {

namespace detail {

/// Signed integer type with the width of T: the type of the ordering key.
template <class T>
using top_k_key_t = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;

/// Key of a NaN: below the key of -inf, above `top_k_no_key`.
template <class K>
inline constexpr K top_k_nan_key = std::numeric_limits<K>::min() + 1;

/// Key of an empty lane: below every score's key.
template <class K>
inline constexpr K top_k_no_key = std::numeric_limits<K>::min();

/// Monotone integer key of a score: a < b as scores iff key(a) < key(b), -0.0 and +0.0 share a key,
/// and every NaN gets `top_k_nan_key`. The bits are sign-magnitude; flipping the magnitude bits of
/// negative values turns them into two's complement order.
template <class T>
top_k_key_t<T> top_k_key(T x) {
  using K = top_k_key_t<T>;
  constexpr K magnitude = std::numeric_limits<K>::max();
  constexpr K inf_bits = std::bit_cast<K>(std::numeric_limits<T>::infinity());
  const K bits = std::bit_cast<K>(T(x + T(0)));  // x + 0 turns -0 into +0
  if ((bits & magnitude) > inf_bits) return top_k_nan_key<K>;
  return bits < 0 ? bits ^ magnitude : bits;
}

/// select() on integer key batches, done on the same bits viewed as T (the blend only moves bits):
/// xsimd 8.1's integer select for avx512bw does not compile without optimisation (its switch also
/// instantiates the 8- and 16-bit blend macros for 32- and 64-bit lanes).
template <class T, class KB, class Mask>
KB top_k_select(const Mask& cond, const KB& if_true, const KB& if_false) {
  using B = xsimd::batch<T, typename KB::arch_type>;
  return xsimd::bitwise_cast<KB>(
      xsimd::select(xsimd::bool_cast(cond), xsimd::bitwise_cast<B>(if_true), xsimd::bitwise_cast<B>(if_false)));
}

}  // namespace detail

/// The ids of the k largest scores, ordered by descending score.
///
/// Order: the larger score first; NaN below everything (also -inf); -0.0 == +0.0; on equal scores (or
/// two NaNs) the lower id first. This is a total order on (score, id), so the result is exactly that
/// of reference::top_k. k sweeps of n: meant for router rows (n = n_experts, k small). No heap.
/// @tparam Arch an xsimd architecture (vector loop + scalar tail) or moe::kernels::scalar
/// @tparam T float or double
/// @param scores n scores
/// @param n number of scores (e.g. n_experts); for float, n < 2^31
/// @param k number of ids to select; precondition 1 <= k <= n (the caller validates)
/// @param ids output, k ids
template <class Arch, class T>
void top_k(Arch, const T* scores, Index n, Index k, Index* ids) {
  static_assert(std::is_floating_point_v<T>, "moe::kernels::top_k: T must be float or double");
  using K = detail::top_k_key_t<T>;
  assert(k >= 1 && k <= n);
  assert(static_cast<std::uint64_t>(n) <= static_cast<std::uint64_t>(std::numeric_limits<K>::max()));
  constexpr K magnitude = std::numeric_limits<K>::max();

  // (prev_key, prev_id): the previous pick. A candidate ranks after it when its key is smaller, or
  // equal with a larger id. The first sweep starts above every key (magnitude is a NaN bit pattern,
  // never a key) so that all entries are candidates.
  K prev_key = magnitude;
  Index prev_id = -1;
  for (Index pick = 0; pick < k; ++pick) {
    K best_key = detail::top_k_no_key<K>;
    Index best_id = -1;
    Index i = 0;
    if constexpr (has_simd<T, Arch>) {
      using B = xsimd::batch<T, Arch>;
      using KB = xsimd::batch<K, Arch>;
      static_assert(KB::size == B::size, "moe::kernels::top_k: key and score batches must have equal lanes");
      constexpr Index lanes = static_cast<Index>(B::size);
      const Index n_vec = n - n % lanes;
      if (n_vec > 0) {
        alignas(Arch::alignment()) K lane_key[B::size];  // (lanes)
        alignas(Arch::alignment()) K lane_id[B::size];   // (lanes)
        for (std::size_t l = 0; l < B::size; ++l) lane_id[l] = static_cast<K>(l);
        KB id = KB::load_aligned(lane_id);
        const KB step(static_cast<K>(lanes)), vmagnitude(magnitude), zero(K(0));
        const KB inf_bits(std::bit_cast<K>(std::numeric_limits<T>::infinity()));
        const KB nan_key(detail::top_k_nan_key<K>);
        const KB vprev_key(prev_key), vprev_id(static_cast<K>(prev_id));
        KB vbest_key(detail::top_k_no_key<K>), vbest_id(K(-1));
        for (; i < n_vec; i += lanes) {
          const KB bits = xsimd::bitwise_cast<KB>(B::load_unaligned(scores + i) + B(T(0)));
          KB key = detail::top_k_select<T>(bits < zero, bits ^ vmagnitude, bits);
          key = detail::top_k_select<T>((bits & vmagnitude) > inf_bits, nan_key, key);
          const auto after_prev = (key < vprev_key) | ((key == vprev_key) & (id > vprev_id));
          // Strictly better: within a lane ids increase, so a tie keeps the lower id.
          const auto better = after_prev & (key > vbest_key);
          vbest_key = detail::top_k_select<T>(better, key, vbest_key);
          vbest_id = detail::top_k_select<T>(better, id, vbest_id);
          id += step;
        }
        vbest_key.store_aligned(lane_key);
        vbest_id.store_aligned(lane_id);
        for (std::size_t l = 0; l < B::size; ++l) {
          const bool better = lane_key[l] > best_key || (lane_key[l] == best_key && lane_id[l] < best_id);
          if (lane_key[l] != detail::top_k_no_key<K> && better) {
            best_key = lane_key[l];
            best_id = static_cast<Index>(lane_id[l]);
          }
        }
      }
    }
    // Tail ids exceed every id seen so far, so only a strictly larger key wins.
    for (; i < n; ++i) {
      const K key = detail::top_k_key(scores[i]);
      const bool after_prev = key < prev_key || (key == prev_key && i > prev_id);
      if (after_prev && key > best_key) {
        best_key = key;
        best_id = i;
      }
    }
    assert(best_id >= 0);
    ids[pick] = best_id;
    prev_key = best_key;
    prev_id = best_id;
  }
}

}  // namespace moe::kernels
